r"""Hamiltonian dynamics on the reduced phase space of the head quotients.

For ``Z = [A; B]`` on :class:`~quotientopt.manifolds.FactorQuotient` with momentum covector
``p = [p_A; p_B]`` the Hamiltonian is

.. math::

    H(Z, p) = T(Z, p) + L(Z), \qquad
    T = \tfrac12 \operatorname{tr}(p_A P^{-1} p_A^\top) + \tfrac12 \operatorname{tr}(p_B Q^{-1} p_B^\top),

the kinetic energy of the preconditioned metric (:math:`P = B^\top B`, :math:`Q = A^\top A`). Its
velocity :math:`\partial_p T = (p_A P^{-1}, p_B Q^{-1})` is the metric's raised momentum, and

.. math:: \partial_A T = -A\, V_B^\top V_B, \qquad \partial_B T = -B\, V_A^\top V_A,
          \qquad V = \partial_p T.

:math:`H` is GL(k)-invariant, so its momentum map :math:`J = A^\top p_A - p_B^\top B` (the metric
pairing of the velocity with the orbit directions) is conserved; the reduced phase space is
:math:`J = 0` (horizontal velocities), where every run starts (:math:`p_0 = 0`).

Integrators (step :math:`h` = ``lr``; both symplectic, time-reversible over a pair of steps,
second order, GL(k)-equivariant stage by stage, so the trajectory of products does not depend on
the starting factorization in exact arithmetic):

``integrator="splitting"`` (default). :math:`H = L + T_A + T_B` with
:math:`T_A = \tfrac12 \operatorname{tr}(p_A P^{-1} p_A^\top)` (depends on :math:`p_A` and
:math:`B` only) and :math:`T_B = \tfrac12 \operatorname{tr}(p_B Q^{-1} p_B^\top)`. Each part's
flow is exact and explicit, because what it moves does not enter its own coefficients:

.. math::

    \varphi^{L}_t &: p \leftarrow p - t\, \nabla L(Z) \\
    \varphi^{T_A}_t &: V_A = p_A P^{-1},\quad A \leftarrow A + t V_A,\quad
        p_B \leftarrow p_B + t\, B\, V_A^\top V_A \quad (B,\ p_A,\ P \text{ fixed}) \\
    \varphi^{T_B}_t &: V_B = p_B Q^{-1},\quad B \leftarrow B + t V_B,\quad
        p_A \leftarrow p_A + t\, A\, V_B^\top V_B \quad (A,\ p_B,\ Q \text{ fixed})

Step :math:`n` is :math:`\varphi^{T_B}_h \circ \varphi^{T_A}_h \circ \varphi^{L}_h` for even
:math:`n` and its adjoint order :math:`\varphi^{T_A}_h \circ \varphi^{T_B}_h \circ
\varphi^{L}_h` for odd :math:`n`; a method composed with its adjoint is symmetric and second
order (Hairer, Lubich, Wanner, *Geometric Numerical Integration*, II.4 and II.5). Each part is
GL(k)-invariant, so each exact flow conserves :math:`J` and the scheme keeps :math:`J = 0` to
round-off with no projection. Cost per step and head: two :math:`k \times k` Grams (one per
moved factor; the next step reuses them), two Cholesky factorizations inverted by matmuls
(:func:`tril_inverse`), and per flow one raise, one :math:`V^\top V` and one :math:`B\,S`
product over the rows: about four passes of ``(rows x k) @ (k x k)`` matmuls over the heads,
batched over every head of a sector; nothing synchronises with the host.

``integrator="implicit"``: the generalized leapfrog / Stormer-Verlet for a non-separable
:math:`H`, its implicit stages solved by ``implicit_iterations`` fixed-point sweeps over the full
tensors, computed in the balanced representative, with the momentum projected back onto
:math:`J = 0` after each step:

.. math::

    p_{n+1/2} &= p_n - \tfrac{h}{2}\,[\nabla L(Z_n) + \partial_Z T(Z_n, p_{n+1/2})] \\
    Z_{n+1} &= Z_n + \tfrac{h}{2}\,[\partial_p T(Z_n, p_{n+1/2}) + \partial_p T(Z_{n+1}, p_{n+1/2})] \\
    p_{n+1} &= e^{-\gamma h}\,\big(p_{n+1/2} - \tfrac{h}{2}\,[\nabla L(Z_{n+1}) + \partial_Z T(Z_{n+1}, p_{n+1/2})]\big)

Which to use when. ``"splitting"`` is much faster (``benchmarks/step_overhead.py``; ``docs/benchmarks.md``) and
is the default. It inverts the Grams of the parameter's own
representative, so frictionless runs from a badly scaled factorization accumulate
representative-dependent rounding: 2.4e-10 relative in the products after 200 float64 steps from
:math:`\kappa(G) = 1000` (4.9e-12 for ``"implicit"``, which steps in the balanced
representative; both below 1e-10 with friction, which contracts rounding errors). Use
``"implicit"`` for long frictionless runs in float64 whose factorizations are far from balanced
and where representative independence must hold to ~1e-11, or for larger steps (its fixed point
is the more stable stage at the edge of stability); use ``"splitting"`` for training.

Both keep :math:`p_0 = 0`, report :math:`T` and :math:`J` at :math:`(Z_n, p_n)` with
:math:`p_n = e^{-\gamma h}(\tilde p - \tfrac h2 \nabla L(Z_n))` (the symmetric point), and finish
the last half-kick at the start of the next ``step()`` (it needs :math:`\nabla L(Z_{n+1})`).
``friction`` :math:`\gamma = 0` is the frictionless mode (the energy error stays bounded, of order
:math:`h^2`, without drift); :math:`\gamma > 0` is conformal-symplectic descent (:math:`H` decays,
:math:`J = 0` is kept). Plain tensors run the leapfrog of :math:`\tfrac12 \|p\|^2 + L` (separable,
explicit) as torch's fused SGD kernel.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch

from quotientopt.linalg import (
    compute_dtype,
    tril_inverse,  # noqa: F401  (importable here)
)
from quotientopt.manifolds.protocol import HeadGeometry, KineticEnergy, require
from quotientopt.optim._base import (
    HeadUpdate,
    Momentum,
    PlainBatch,
    QuotientOptimizer,
    WriteLog,
    check_choice,
    check_number,
    geometry_of,
    manifold_of,
)
from quotientopt.optim._torch_kernels import (
    _fused_kernel_is_exact,  # noqa: F401  (the one rule, importable here)
    torch_sgd_step,
)
from quotientopt.optim.ecd import ecd_updates, refuse_sharded
from quotientopt.optim.hamiltonian_flows import (
    Implicit,
    Splitting,
    _spd_inverse,
    transfer,  # noqa: F401  (importable here)
)

_KINETIC_FIX = (
    "build it with metric='preconditioned', damping=0 (FactorQuotient or a subgroup of it), or "
    "step it with QuotientSGD / QuotientAdam"
)


def velocity(manifold: HeadGeometry, z: torch.Tensor, p: torch.Tensor, grams) -> torch.Tensor:
    r""":math:`\partial_p T = (p_A P^{-1}, p_B Q^{-1})`."""
    return manifold.egrad2rgrad(z, p, grams=grams)


def velocity_momentum_map(
    manifold: HeadGeometry, z: torch.Tensor, v: torch.Tensor, grams
) -> torch.Tensor:
    r""":math:`J` of the momentum whose velocity is ``v``: the geometry's own momentum map
    (:math:`GL(k)`: :math:`A^\top v_A P - Q v_B^\top B`; a subgroup: its projection onto the
    subgroup's algebra). Deprecated: call ``manifold.momentum_map(z, v, grams=grams)``."""
    return manifold.momentum_map(z, v, grams=grams)


def kinetic_force(manifold: HeadGeometry, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial_Z T = (-A V_B^\top V_B,\; -B V_A^\top V_A)` at velocity ``v`` (the
    :class:`~quotientopt.manifolds.protocol.KineticEnergy` capability of the geometry)."""
    require(manifold, KineticEnergy, "kinetic_force", _KINETIC_FIX)
    return manifold.kinetic_force(z, v)


def kinetic_energy(
    manifold: HeadGeometry, z: torch.Tensor, p: torch.Tensor, grams=None
) -> torch.Tensor:
    r""":math:`T(Z, p)` per head, shape ``z.shape[:-2]``, in float32 or better."""
    grams = manifold.grams(z, check=False) if grams is None else grams
    v = velocity(manifold, z, p, grams)
    return 0.5 * (p.to(grams.p.dtype) * v.to(grams.p.dtype)).sum((-1, -2))


def momentum_map(manifold: HeadGeometry, z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    r""":math:`J = A^\top p_A - p_B^\top B` (``k x k`` per head): the metric pairing of the velocity
    with the orbit directions; zero exactly when the velocity is horizontal."""
    a, b = manifold.factors(z)
    pa, pb = manifold.factors(p)
    return a.mT @ pa - pb.mT @ b


def spd_inverse(
    gram: torch.Tensor, reference: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`G^{-1} = L^{-\top} L^{-1}` of SPD ``(..., k, k)`` matrices from their Cholesky factor
    (:func:`tril_inverse`), and the per-matrix health flag of
    :func:`~quotientopt.linalg.spd_cholesky_flagged` (``reference``: the previous Gram of the same
    factor, so that a collapse counts as rank loss). Unhealthy entries get the identity; no host
    synchronisation."""
    inverse, _, ok = _spd_inverse(gram, reference)
    return inverse, ok


INTEGRATORS = ("splitting", "implicit")


class QuotientHamiltonian(QuotientOptimizer):
    r"""Symplectic Hamiltonian dynamics for the heads (see the module docstring for the equations
    and for which integrator to use when).

    Args:
        params: parameters or parameter groups.
        lr: the time step :math:`h`.
        friction: :math:`\gamma \ge 0`; 0 is frictionless (energy-conserving), > 0 descends.
        integrator: ``"splitting"`` (default; explicit, exact sub-flows, batched ``k x k`` work)
            or ``"implicit"`` (the generalized leapfrog with fixed-point sweeps).
        implicit_iterations: fixed-point sweeps for each implicit stage (>= 1; ``"implicit"``).
        diagnostics: compute the kinetic energy and the momentum map at :math:`(Z_n, p_n)` every
            step (:meth:`kinetic_energy`, ``state[p]["momentum_map"]``). ``"auto"`` (default):
            when ``friction == 0``, where energy conservation is what the dynamics is for; they
            cost about one pass over the heads (a raise and a cross product) and one reduction
            over every plain tensor.
        on_nonfinite: as for :class:`~quotientopt.optim.QuotientSGD` (``"skip"``, ``"warn"``,
            ``"raise"``); a skipped step leaves positions and momenta untouched.

    State (between steps): ``state[p]["momentum"]`` the momentum covector :math:`\tilde p` of the
    head parameters after the step's kinetic sub-flows (the next step starts with its kick);
    plain tensors keep a torch SGD ``momentum_buffer`` :math:`b` with :math:`\tilde p = -\sigma b`
    (``state[p]["momentum_scale"]`` :math:`\sigma`), so that their leapfrog is one fused torch
    kernel. :meth:`momentum` reports both (the heads' as a velocity). With diagnostics,
    ``state[p]["momentum_map"]`` and ``state[p]["kinetic"]`` hold :math:`J` and :math:`T` per
    head at :math:`(Z_n, p_n)` of the last step.

    ``mode="ecd"`` (deprecated: use :class:`~quotientopt.optim.QuotientECD`) replaces the
    leapfrog by energy-conserving descent, computed by :func:`quotientopt.optim.ecd.ecd_group`
    with ``eta`` and ``loss_floor``; it needs ``step(closure)``; its state is
    ``state[p]["velocity"]``.

    Quotient parameters must live on a head geometry with a kinetic energy
    (``FactorQuotient(metric="preconditioned", damping=0)`` or a subgroup of it); plain tensors
    follow the Euclidean leapfrog.
    """

    # restored in float32 or better by load_state_dict (KeepStateDtypes)
    full_precision_state = ("kinetic", "momentum_map", "grams")

    def _full_precision_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        return self.full_precision_state  # the kinetic energy is float64 for plain tensors too

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        friction: float = 0.0,
        *,
        mode: str = "hamiltonian",
        integrator: str = "splitting",
        eta: float = 1.0,
        loss_floor: float = 0.0,
        implicit_iterations: int = 3,
        diagnostics: bool | str = "auto",
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        check_number("friction", friction, 0.0, float("inf"))
        check_choice("mode", mode, ("hamiltonian", "ecd"))
        if mode == "ecd":
            warnings.warn(
                "QuotientHamiltonian(mode='ecd') is deprecated; use quotientopt.optim.QuotientECD "
                "(the same update, which this mode now delegates to)",
                DeprecationWarning,
                stacklevel=2,
            )
        check_choice("integrator", integrator, INTEGRATORS)
        check_number("eta", eta, 0.0, float("inf"), low_open=True)
        check_number("loss_floor", loss_floor, -float("inf"), float("inf"))
        if not isinstance(implicit_iterations, int) or implicit_iterations < 1:
            raise ValueError(
                f"invalid implicit_iterations: {implicit_iterations!r}; expected an int >= 1"
            )
        if diagnostics not in (True, False, "auto"):
            raise ValueError(
                f"invalid diagnostics: {diagnostics!r}; expected True, False or 'auto'"
            )
        super().__init__(
            params,
            dict(
                lr=lr,
                friction=friction,
                mode=mode,
                integrator=integrator,
                eta=eta,
                loss_floor=loss_floor,
                implicit_iterations=implicit_iterations,
                diagnostics=diagnostics,
            ),
            on_nonfinite=on_nonfinite,
        )

    def invalidate(self) -> None:
        """As :meth:`QuotientOptimizer.invalidate`: the Grams cached with each head's momentum
        are recomputed at the next step."""
        for state in self.state.values():
            state.pop("grams_version", None)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.param_groups[-1]["mode"] == "ecd":
            for p in self.param_groups[-1]["params"]:
                refuse_sharded(p, "QuotientHamiltonian(mode='ecd')")

    @staticmethod
    def _check_parameter(p: torch.Tensor) -> None:
        geometry = geometry_of(p)
        if geometry is not None:
            require(geometry, KineticEnergy, "QuotientHamiltonian", _KINETIC_FIX)
        elif manifold_of(p) is not None:
            raise ValueError(
                f"QuotientHamiltonian supports FactorQuotient and plain parameters, not {p.manifold!r}; "
                "step those with QuotientSGD or geoopt's optimizers (see quotientopt.optim.HybridOptimizer)"
            )

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        r"""The momentum at ``p``: for head parameters the velocity (a tangent vector,
        :math:`\tilde p\,G^{-1}` at the current point) of the momentum the next step starts from,
        for the others the Euclidean momentum :math:`\tilde p` (a covector); None before the
        first step."""
        state = self.state[p] if p in self.state else {}
        if "velocity" in state:  # ECD and the implicit integrator keep a velocity
            return Momentum(
                state["velocity"], "vector" if geometry_of(p) is not None else "covector"
            )
        if "momentum" in state:
            geometry = geometry_of(p)
            z = p.detach()
            grams = geometry.grams(z, check=False)
            return Momentum(geometry.egrad2rgrad(z, state["momentum"], grams=grams), "vector")
        if "momentum_buffer" in state:
            return Momentum(-state["momentum_scale"] * state["momentum_buffer"], "covector")
        return None

    def kinetic_energy(self) -> torch.Tensor:
        """Total kinetic energy :math:`T(Z_n, p_n)` at the start of the last step (a tensor; 0
        when diagnostics are off)."""
        total = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                t = self.state[p].get("kinetic") if p in self.state else None
                if t is not None:
                    total = total + t.to(total.device, torch.float64).sum()
        return total

    # ------------------------------------------------------------------------------ the kernels
    def _group_update(
        self, group: dict, loss: torch.Tensor | None, nonfinite: dict
    ) -> list[tuple[torch.Tensor, HeadUpdate]] | None:
        """``mode="ecd"`` (deprecated): the group is one ECD point (:func:`ecd_group`)."""
        if group["mode"] != "ecd":
            return None
        if loss is None:
            raise ValueError(
                "QuotientHamiltonian(mode='ecd') needs the loss value: call "
                "optimizer.step(closure) with a closure that returns the loss"
            )
        return ecd_updates(group, loss, nonfinite, self.state)

    def _integrator(self, group: dict) -> Splitting | Implicit:
        """The group's integrator object, from its ``integrator`` and ``implicit_iterations``."""
        if group["integrator"] == "implicit":
            return Implicit(group["implicit_iterations"])
        if "_splitting" not in self.__dict__:
            self._splitting = Splitting(self._work, self._warn_if_rank_deficient)
        return self._splitting

    @staticmethod
    def _dynamics(group: dict) -> tuple[float, float, bool]:
        """``(h, e^{-gamma h}, diagnostics)`` of a group."""
        diagnostics = group["diagnostics"]
        if diagnostics == "auto":
            diagnostics = group["friction"] == 0
        return group["lr"], math.exp(-group["friction"] * group["lr"]), bool(diagnostics)

    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict, keep: torch.Tensor
    ) -> HeadUpdate:
        h, damping, diagnose = self._dynamics(group)
        integrator = self._integrator(group)
        return integrator.update(p, geometry, self.state[p], keep, h, damping, diagnose)

    def _stepped(self, p: torch.Tensor, group: dict, update: HeadUpdate) -> None:
        self._integrator(group).stepped(p.detach(), self.state[p], update.aux)

    @property
    def _work(self) -> WriteLog:
        """The reused work buffers, per parameter (created on first use, also after unpickling,
        which keeps only the state)."""
        if "_work_log" not in self.__dict__:
            self._work_log = WriteLog()
        return self._work_log

    # --------------------------------------------------------------------------- plain tensors
    def _plain_step(self, group: dict, batch: PlainBatch) -> None:
        r"""The leapfrog of :math:`H = \tfrac12 \|p\|^2 + L` for plain tensors as torch's SGD
        kernel: with :math:`\tilde p = -\sigma b` and :math:`c = (1 + e^{-\gamma h}) h / 2`
        (:math:`h/2` on the first step),
        :math:`b \leftarrow (e^{-\gamma h} \sigma / c)\, b + g`, :math:`x \leftarrow x - h c\, b`,
        :math:`\sigma \leftarrow c` is
        :math:`\tilde p \leftarrow e^{-\gamma h} (\tilde p - \tfrac h2 g) - \tfrac h2 g`,
        :math:`x \leftarrow x + h \tilde p`, and a step with a non-finite gradient changes nothing
        (``found_inf``)."""
        params, found_inf = batch.params, batch.found_inf
        h, damping, diagnostics = self._dynamics(group)
        by_call: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            first = "momentum_buffer" not in state
            sigma = state.get("momentum_scale", 1.0)
            c = 0.5 * h if first else 0.5 * (1.0 + damping) * h
            if diagnostics:
                state["kinetic"] = self._plain_kinetic(p, state, h, damping, first)
            by_call[(first, sigma, c)].append(p)
        for (first, sigma, c), ps in by_call.items():
            buffers = torch_sgd_step(
                [p.detach() for p in ps],
                [p.grad for p in ps],
                [self.state[p].get("momentum_buffer") for p in ps],
                found_inf,
                weight_decay=0.0,
                momentum=1.0 if first else damping * sigma / c,
                lr=h * c,
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
            for p, buf in zip(ps, buffers, strict=True):
                self.state[p]["momentum_buffer"] = buf
                self.state[p]["momentum_scale"] = c

    #: elements per chunk of the plain tensors' kinetic energy (a 4 MB float32 scratch)
    kinetic_chunk = 1 << 20

    def _plain_kinetic(self, p, state, h, damping, first):
        r""":math:`\tfrac12 \|p_n\|^2` with :math:`p_n = e^{-\gamma h}(\tilde p - \tfrac h2 g)
        = -e^{-\gamma h}(\sigma b + \tfrac h2 g)`, in float64 (0 on the first step).

        :math:`\|g + (2\sigma/h)\, b\|` is summed over chunks of ``kinetic_chunk`` elements
        that pass through one reused scratch tensor: the whole sum as one temporary allocated a
        fresh tensor the size of the parameter on every step (on a CPU, paged in at several times
        the cost of the arithmetic), and the expansion
        :math:`\|g\|^2 + 2a\langle g, b\rangle + a^2\|b\|^2` would cancel when :math:`p_n` is small."""
        if first:
            return torch.zeros((), dtype=torch.float64, device=p.device)
        buf, sigma = state["momentum_buffer"], state["momentum_scale"]
        scratch = self._kinetic_scratch(p.grad)
        squares = torch.zeros((), dtype=torch.float64, device=p.device)
        chunks = zip(
            p.grad.reshape(-1).split(self.kinetic_chunk),
            buf.reshape(-1).split(self.kinetic_chunk),
            strict=True,
        )
        for g, b in chunks:
            if g.dtype == scratch.dtype:
                part = torch.add(g, b, alpha=2.0 * sigma / h, out=scratch[: g.numel()])
            else:  # bfloat16/float16: widen first, then add
                part = scratch[: g.numel()].copy_(g).add_(b, alpha=2.0 * sigma / h)
            if part.dtype in (torch.float32, torch.float64):  # BLAS dot: fast, 3e-6 relative
                squares += torch.dot(part, part).double()
            else:
                squares += torch.linalg.vector_norm(part, dtype=torch.float64).square()
        return 0.5 * (damping * 0.5 * h) ** 2 * squares

    def _kinetic_scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The reused 1-D scratch of :meth:`_plain_kinetic` for ``like``'s device, in float32 or
        better (a bfloat16 sum ``g + (2 sigma / h) b`` would round before the float64 square)."""
        dtype = compute_dtype(like.dtype)
        key = (dtype, like.device)
        scratches = self.__dict__.setdefault("_scratches", {})
        if key not in scratches:
            scratches[key] = torch.empty(self.kinetic_chunk, dtype=dtype, device=like.device)
        return scratches[key]

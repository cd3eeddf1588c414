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
from torch.optim.sgd import sgd as torch_sgd

from quotientopt.linalg import compute_dtype, spd_cholesky_flagged, tril_inverse
from quotientopt.manifolds.protocol import Grams, HeadGeometry
from quotientopt.optim._base import (
    Momentum,
    QuotientOptimizer,
    WriteLog,
    _fused_kernel_is_exact,
    check_choice,
    check_number,
    geometry_of,
    manifold_of,
    where_heads,
    work_buffers,
)
from quotientopt.optim.ecd import ecd_group, refuse_sharded, write_ecd


def velocity(manifold: HeadGeometry, z: torch.Tensor, p: torch.Tensor, grams) -> torch.Tensor:
    r""":math:`\partial_p T = (p_A P^{-1}, p_B Q^{-1})`."""
    return manifold.egrad2rgrad(z, p, grams=grams)


def transfer(
    manifold: HeadGeometry, z: torch.Tensor, y: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    r"""The velocity at ``y`` of the momentum whose velocity at ``z`` is ``v``:
    :math:`(v_A P_z P_y^{-1},\; v_B Q_z Q_y^{-1})`, computed as
    :math:`v_A - v_A\, \Delta P\, P_y^{-1}` with :math:`\Delta P = P_y - P_z` formed from the
    increment :math:`\Delta B = B_y - B_z` (no cancellation between nearly equal Grams)."""
    a, b = manifold.factors(z)
    da, db = manifold.factors(y - z)
    dtype = compute_dtype(z.dtype)
    a, b, da, db = (t.to(dtype) for t in (a, b, da, db))

    def delta(f, df):  # (F + dF)^T (F + dF) - F^T F
        cross = f.mT @ df
        return cross + cross.mT + df.mT @ df

    grams = manifold.grams(y, check=False)
    va, vb = manifold.factors(v)
    correction = torch.cat((va.to(dtype) @ delta(b, db), vb.to(dtype) @ delta(a, da)), dim=-2).to(
        v.dtype
    )
    return v - manifold.egrad2rgrad(y, correction, grams=grams)


def velocity_momentum_map(
    manifold: HeadGeometry, z: torch.Tensor, v: torch.Tensor, grams
) -> torch.Tensor:
    r""":math:`J` of the momentum whose velocity is ``v``: :math:`A^\top v_A P - Q v_B^\top B`."""
    a, b = manifold.factors(z)
    va, vb = manifold.factors(v)
    dtype = grams.p.dtype
    a, b, va, vb = (t.to(dtype) for t in (a, b, va, vb))
    return a.mT @ va @ grams.p - grams.q @ vb.mT @ b


def kinetic_force(manifold: HeadGeometry, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\partial_Z T = (-A V_B^\top V_B,\; -B V_A^\top V_A)` at velocity ``v``."""
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
    chol, ok = spd_cholesky_flagged(gram, reference)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.where(ok[..., None, None], chol, eye)
    x = tril_inverse(chol)
    return x.mT @ x, ok


INTEGRATORS = ("splitting", "implicit")


def _add_right_product(out: torch.Tensor, x: torch.Tensor, mat: torch.Tensor, alpha: float) -> None:
    r"""``out += alpha * x @ mat`` in place (``x``, ``out``: ``(..., r, k)``, ``mat``:
    ``(..., k, k)``), one batched ``baddbmm`` when ``out`` flattens to a 3-d view."""
    r, k = x.shape[-2:]
    try:
        target = out.view(-1, r, k)
    except RuntimeError:
        out.add_(x @ mat, alpha=alpha)
        return
    target.baddbmm_(
        x.reshape(-1, r, k), mat.expand(*x.shape[:-2], k, k).reshape(-1, k, k), alpha=alpha
    )


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
            if not geometry.supports_kinetic_energy:
                raise ValueError(
                    "QuotientHamiltonian needs a head geometry with a kinetic energy "
                    "(FactorQuotient(metric='preconditioned', damping=0) or a subgroup of it); "
                    f"got {geometry!r}"
                )
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

    def _step(self, nonfinite: dict[torch.device, torch.Tensor], loss: torch.Tensor | None) -> None:
        pending, ecd = [], []
        for group in self.param_groups:
            if group["mode"] == "ecd":
                if loss is None:
                    raise ValueError(
                        "QuotientHamiltonian(mode='ecd') needs the loss value: call "
                        "optimizer.step(closure) with a closure that returns the loss"
                    )
                ecd += ecd_group(group, loss.detach(), nonfinite, self.state)
                continue
            h, damping = group["lr"], math.exp(-group["friction"] * group["lr"])
            diagnostics = group["diagnostics"]
            if diagnostics == "auto":
                diagnostics = group["friction"] == 0
            plain = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if geometry_of(p) is None:
                    plain.append(p)
                elif group["integrator"] == "implicit":
                    pending.append(self._implicit_step(p, p.grad, h, damping, group, nonfinite))
                else:
                    pending.append(self._splitting_step(p, p.grad, h, damping, diagnostics))
            if plain:
                self._euclidean_leapfrog(plain, h, damping, diagnostics, nonfinite)
        self._enforce_policy(nonfinite, [healthy for _, healthy, _ in pending])
        for p, healthy, commit in pending:
            keep = (nonfinite[p.device] == 0) & healthy
            commit(keep)
            self._count(self._rank_skips, p.device, (~healthy & (nonfinite[p.device] == 0)).sum())
        write_ecd(self.state, ecd)

    # ------------------------------------------------------------------ the splitting integrator
    def _gram(self, geometry: HeadGeometry, z: torch.Tensor, which: int, reference=None):
        r"""``(G, chol, G^{-1}, ok)`` of factor ``which`` (0: :math:`Q = A^\top A`, 1:
        :math:`P = B^\top B`) of ``z``, reduced over row shards."""
        if geometry.is_row_sharded:
            gram = geometry.cross(z, z)[which]
        else:
            f = geometry.factors(z)[which]
            gram = f.mT @ f
        chol, ok = spd_cholesky_flagged(gram, reference)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        chol = torch.where(ok[..., None, None], chol, eye)
        x = tril_inverse(chol)
        return gram, chol, x.mT @ x, ok

    @staticmethod
    def _regularize(cache: dict) -> tuple[dict, torch.Tensor]:
        r"""For heads whose Grams are not both regular (a rank-deficient start, e.g. a
        zero-initialized factor): the inverses of :math:`G + \delta I` with
        :math:`\delta = 0.1\,(\mathrm{tr}\,Q + \mathrm{tr}\,P) / 2k` (1 where both vanish), and
        their flag. As in :meth:`FactorQuotient.grams` with ``regularize=True``: the kinetic flow
        of a factor only moves it along the range of its momentum, which lies in the range of
        the other factor's Gram, so the regularized metric moves such a head onto the full-rank
        set (not GL(k)-equivariantly), where the exact flow takes over."""
        (q, *_, ok_q), (p, *_, ok_p) = cache[0], cache[1]
        ok = ok_q & ok_p
        k = q.shape[-1]
        scale = (q.diagonal(dim1=-2, dim2=-1).sum(-1) + p.diagonal(dim1=-2, dim2=-1).sum(-1)) / (
            2 * k
        )
        delta = torch.where(scale > 0, 0.1 * scale, torch.ones_like(scale))[..., None, None]
        eye = torch.eye(k, dtype=q.dtype, device=q.device)
        out, usable = {}, ~ok
        for w, (g, chol, inv, flag) in cache.items():
            damped = g + delta * eye
            reg_chol, info = torch.linalg.cholesky_ex(damped)
            usable = usable & (info == 0) & torch.isfinite(damped).flatten(-2).all(-1)
            x = tril_inverse(torch.where((info == 0)[..., None, None], reg_chol, eye))
            mask = ok[..., None, None]
            out[w] = (g, torch.where(mask, chol, reg_chol), torch.where(mask, inv, x.mT @ x), flag)
        return out, usable

    @property
    def _work(self) -> WriteLog:
        """The reused work buffers, per parameter (created on first use, also after unpickling,
        which keeps only the state)."""
        if "_work_log" not in self.__dict__:
            self._work_log = WriteLog()
        return self._work_log

    def _work_buffers(self, p: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Two reused tensors shaped like ``p`` in ``dtype`` (the new point and the spare
        momentum; :func:`~quotientopt.optim._base.work_buffers`)."""
        return work_buffers(self._work, p, 2, dtype)

    def _velocity_buffer(self, p: torch.Tensor, which: int, like: torch.Tensor) -> torch.Tensor:
        """A reused contiguous tensor shaped like factor ``which``'s momentum ``like``."""
        (buffer,) = work_buffers(
            self._work, p, 1, like.dtype, key=f"velocity{which}", shape=like.shape
        )
        return buffer

    def _splitting_step(self, p, grad, h, damping, diagnostics):
        r"""One step of the splitting integrator (module docstring), batched over the heads:
        the kick, then the exact flows of :math:`T_A` and :math:`T_B` for ``h`` each, in the order
        that alternates from step to step. Returns ``(p, healthy, commit)``: ``commit(keep)``
        writes the new point and momentum where the per-head flag ``keep`` holds."""
        geometry: HeadGeometry = p.manifold
        state = self.state[p]
        z = p.detach()
        dtype = compute_dtype(z.dtype)
        zc = z.to(dtype)
        g = grad.to(dtype)
        old = state.get("momentum")
        if old is None and "velocity" in state:  # switched from the implicit integrator
            grams = geometry.grams(z, check=False)
            old = geometry.right_multiply(state.pop("velocity").to(dtype), grams.p, grams.q)
        cache = state.get("grams")
        if cache is None or state.get("grams_version") != (z._version, z.data_ptr()):
            cache = {w: self._gram(geometry, zc, w) for w in (0, 1)}
        cache, regularized = self._regularize(cache)
        start = dict(cache)
        # kick: p_n = e^{-gamma h} (p~ - h/2 g) ends the last step, p_n - h/2 g starts this one
        # the new point and momentum go to reused buffers (the momentum's alternates with the
        # stored one; see commit); a fresh 100 MB allocation per step is paged in at a cost
        # comparable to the arithmetic on a CPU
        new, spare = self._work_buffers(p, dtype)
        if old is not None and spare.data_ptr() == old.data_ptr():  # never kick over the old one
            spare = torch.empty_like(spare)
        if old is None:
            m = torch.mul(g, -0.5 * h, out=spare)
        else:
            m = torch.mul(old.to(dtype), damping, out=spare)
            m.add_(g, alpha=-0.5 * h * damping)
        if diagnostics:
            if old is None:  # p_n = 0
                heads = z.shape[:-2]
                kinetic = torch.zeros(heads, dtype=dtype, device=z.device)
                charge = torch.zeros(
                    (*heads, z.shape[-1], z.shape[-1]), dtype=dtype, device=z.device
                )
            else:
                kinetic, charge = self._diagnostics(geometry, zc, m, cache, work=new)
        else:
            kinetic = charge = None
        if old is not None:
            m.add_(g, alpha=-0.5 * h)
        current = list(geometry.factors(zc))
        moved = geometry.factors(new)
        momenta = geometry.factors(m)
        healthy = (cache[0][3] & cache[1][3]) | regularized
        parity = state.get("step", 0) % 2
        for x in (0, 1) if parity == 0 else (1, 0):  # T_A then T_B, or T_B then T_A
            y = 1 - x
            # V_X = p_X G_Y^{-1}, G_Y fixed during this flow (into a reused contiguous buffer)
            v = torch.matmul(momenta[x], cache[y][2], out=self._velocity_buffer(p, x, momenta[x]))
            torch.add(current[x], v, alpha=h, out=moved[x])  # X += h V_X
            current[x] = moved[x]
            s = self._contract(geometry, m, v, x)  # V_X^T V_X
            _add_right_product(momenta[y], current[y], s, h)  # p_Y += h Y V_X^T V_X
            cache[x] = self._gram(geometry, new, x, reference=cache[x][0])
            # a head that started rank-deficient only has to stay finite on its way to full rank
            healthy = healthy & (cache[x][3] | regularized) & torch.isfinite(s).flatten(-2).all(-1)
        if state.get("step", 0) == 0:
            self._warn_if_rank_deficient(regularized)
        state["step"] = state.get("step", 0) + 1

        def commit(keep):
            mask = keep[..., None, None]
            where_heads(keep, new.to(z.dtype), z, out=z)
            stored = m.to(z.dtype)
            state["momentum"] = where_heads(
                keep, stored, torch.zeros((), dtype=z.dtype) if old is None else old, out=stored
            )
            if stored is m:  # the old momentum (a new tensor on the first step) is the next spare
                reusable = old is not None and old.dtype == m.dtype and old.shape == m.shape
                self._work.put(p, "work", (new, old if reusable else torch.empty_like(m)))
            state["grams"] = {
                w: tuple(
                    torch.where(mask if t.dim() > keep.dim() else keep, t, t0)
                    for t, t0 in zip(cache[w], start[w], strict=True)
                )
                for w in (0, 1)
            }
            state["grams_version"] = (z._version, z.data_ptr())
            if kinetic is not None:
                state["kinetic"] = kinetic
                state["momentum_map"] = charge

        return p, healthy, commit

    @staticmethod
    def _contract(geometry: HeadGeometry, like: torch.Tensor, v: torch.Tensor, which: int):
        r""":math:`V^\top V` for the factor-shaped ``v`` of factor ``which``, summed over row
        shards (through the protocol's ``cross`` when the rows are sharded)."""
        if not geometry.is_row_sharded:
            return v.mT @ v
        full = torch.zeros_like(like)
        geometry.factors(full)[which].copy_(v)
        return geometry.cross(full, full)[which]

    @staticmethod
    def _diagnostics(geometry: HeadGeometry, z, m, cache, work=None):
        r""":math:`T = \tfrac12 \langle p, p\,G^{-1}\rangle` per head and the group's momentum
        map :math:`J` of :math:`p` (``geometry.momentum_map`` of its velocity). ``work``: a
        tensor shaped like ``z`` that may receive the velocity (the step's new-point buffer,
        free until the flows write it)."""
        q, chol_q, q_inv, ok_q = cache[0]
        pg, chol_p, p_inv, ok_p = cache[1]
        grams = Grams(pg, q, chol_p, chol_q, ok_p & ok_q, p_inv, q_inv)
        velocity = geometry.egrad2rgrad(z, m, grams=grams, out=work)
        if geometry.is_row_sharded:
            kinetic = 0.5 * geometry.inner(z, velocity, grams=grams)
        else:  # one dot product per head as a batched (1 x N) @ (N x 1): no full-size temporary
            dot = m.flatten(-2).unsqueeze(-2) @ velocity.flatten(-2).unsqueeze(-1)
            kinetic = 0.5 * dot[..., 0, 0]
        return kinetic, geometry.momentum_map(z, velocity, grams=grams)

    # --------------------------------------------------------------------------- plain tensors
    def _euclidean_leapfrog(self, params, h, damping, diagnostics, nonfinite):
        r"""The leapfrog of :math:`H = \tfrac12 \|p\|^2 + L` for plain tensors as torch's SGD
        kernel: with :math:`\tilde p = -\sigma b` and :math:`c = (1 + e^{-\gamma h}) h / 2`
        (:math:`h/2` on the first step),
        :math:`b \leftarrow (e^{-\gamma h} \sigma / c)\, b + g`, :math:`x \leftarrow x - h c\, b`,
        :math:`\sigma \leftarrow c` is
        :math:`\tilde p \leftarrow e^{-\gamma h} (\tilde p - \tfrac h2 g) - \tfrac h2 g`,
        :math:`x \leftarrow x + h \tilde p`, and a step with a non-finite gradient changes nothing
        (``found_inf``)."""
        by_call: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        for p in params:
            state = self.state[p]
            first = "momentum_buffer" not in state
            sigma = state.get("momentum_scale", 1.0)
            c = 0.5 * h if first else 0.5 * (1.0 + damping) * h
            if diagnostics:
                state["kinetic"] = self._plain_kinetic(p, state, h, damping, first)
            by_call[(p.device, first, sigma, c)].append(p)
        for (device, first, sigma, c), ps in by_call.items():
            found_inf = nonfinite[device]
            momentum = 0.0 if first else damping * sigma / c
            fused = [p for p in ps if _fused_kernel_is_exact(p)]
            if fused:
                buffers = [self.state[p].get("momentum_buffer") for p in fused]
                torch_sgd(
                    [p.detach() for p in fused],
                    [p.grad for p in fused],
                    buffers,
                    fused=True,
                    found_inf=found_inf,
                    weight_decay=0.0,
                    momentum=momentum if not first else 1.0,
                    lr=h * c,
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                )
                for p, buf in zip(fused, buffers, strict=True):
                    if first:  # the kernel allocates first-step buffers uninitialized
                        zero = torch.zeros((), dtype=buf.dtype, device=buf.device)
                        torch.where(found_inf > 0, zero, buf, out=buf)
                    self.state[p]["momentum_buffer"] = buf
            for p in ps:
                if not _fused_kernel_is_exact(p):
                    state = self.state[p]
                    keep = found_inf == 0
                    buf = state.get("momentum_buffer")
                    new_buf = p.grad.clone() if first else buf * momentum + p.grad
                    new = p.detach() - (h * c) * new_buf
                    p.detach().copy_(torch.where(keep, new, p.detach()))
                    old = torch.zeros_like(new_buf) if buf is None else buf
                    state["momentum_buffer"] = torch.where(keep, new_buf, old)
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

    # ------------------------------------------------------------------- the implicit integrator
    def _implicit_step(self, p, grad, h, damping, group, nonfinite):
        """The implicit leapfrog (:meth:`_implicit_leapfrog`); its state is the velocity
        ``state[p]["velocity"]`` (converting it to and from a covector each step would invert
        the Grams of the parameter's own representative, which is what it avoids)."""
        state = self.state[p]
        z = p.detach()
        old = state.get("velocity")
        if old is None and "momentum" in state:  # switched from the splitting integrator
            grams = p.manifold.grams(z, check=False)
            old = p.manifold.egrad2rgrad(z, state.pop("momentum"), grams=grams)
        new, v_new, kinetic, healthy = self._implicit_leapfrog(
            p, grad, old, h, damping, group["implicit_iterations"]
        )

        def commit(keep):
            where_heads(keep, new, z, out=z)
            state["velocity"] = where_heads(
                keep, v_new, torch.zeros_like(v_new) if old is None else old
            )
            state["kinetic"] = kinetic
            state.pop("grams", None)

        return p, healthy, commit

    def _implicit_leapfrog(self, p, grad, carried, h, damping, iterations):
        r"""The leapfrog in velocity variables :math:`v = \partial_p T` (raised momenta): forces are
        raised like gradients, and a velocity moves from :math:`Z_n` to :math:`Z_{n+1}` by
        :func:`transfer`, which avoids lowering and raising with ill-conditioned Grams.

        The step is computed at the balanced representative :math:`Z M` of the point
        (:meth:`FactorQuotient.balancing_transform`) and carried back by :math:`M^{-1}`: every
        stage is GL(k)-equivariant, so this is the same step in exact arithmetic, while in
        floating point the Grams it inverts are as well conditioned as the product allows, not
        :math:`\kappa(G)^2` worse for a badly scaled factorization. Frictionless dynamics never
        contracts rounding errors, so this is what keeps its trajectory of products independent
        of the starting factorization to 1e-11 over 200 steps at :math:`\kappa(G) = 1000`
        (1.4e-10 computed in the parameter's own representative). Row-sharded sectors step in
        their own representative."""
        manifold: HeadGeometry = p.manifold
        point = z = p.detach()
        frame = None if manifold.is_row_sharded else manifold.balancing_transform(z)
        if frame is not None:
            # rank-deficient heads have no balanced representative: they step in their own
            m_a, m_b = frame
            finite = (torch.isfinite(m_a) & torch.isfinite(m_b)).flatten(-2).all(-1)
            eye = torch.eye(m_a.shape[-1], dtype=m_a.dtype, device=m_a.device)
            m_a = torch.where(finite[..., None, None], m_a, eye)
            m_b = torch.where(finite[..., None, None], m_b, eye)
            # in float32 or better, so that a bf16 point is not rounded on the way; tangent
            # vectors move like points, gradients (covectors) inversely
            dtype = m_a.dtype
            z = manifold.right_multiply(z.to(dtype), m_a, m_b)
            grad = manifold.right_multiply(grad.to(dtype), m_b, m_a)
            if carried is not None:
                carried = manifold.right_multiply(carried.to(dtype), m_a, m_b)
        grams = manifold.grams(z, check=False)

        def force(v):  # raised [grad L + dT/dZ](Z_n, v)
            return manifold.egrad2rgrad(z, grad + kinetic_force(manifold, z, v), grams=grams)

        if carried is None:
            v_n = torch.zeros_like(z)
        else:  # finish the previous step at Z_n, then stay on the reduced phase space J = 0
            v_n = manifold.proju(z, damping * (carried - 0.5 * h * force(carried)), grams=grams)
        momentum_map = manifold.momentum_map(z, v_n, grams=grams)
        kinetic = 0.5 * manifold.inner(z, v_n, grams=grams)
        v_half = v_n
        for _ in range(iterations):  # v_{n+1/2} = v_n - h/2 force(v_{n+1/2})
            v_half = v_n - 0.5 * h * force(v_half)
        increment = h * v_half
        new = z + increment
        for _ in range(iterations):  # Z_{n+1} = Z_n + h/2 [v_{n+1/2} + transfer(v_{n+1/2})]
            increment = 0.5 * h * (v_half + transfer(manifold, z, new, v_half))
            new = z + increment
        v_new = transfer(manifold, z, new, v_half)
        # a step too large for the implicit stage diverges: such heads keep their point
        healthy = manifold.grams(new, check=False, reference=grams).ok & grams.ok
        if frame is not None:  # back to the parameter's representative: M^{-1} = (M_B^T, M_A^T)
            # only the increment is carried back and added, so a point at rest stays bitwise put
            new = point + manifold.right_multiply(increment, m_b.mT, m_a.mT).to(point.dtype)
            v_new = manifold.right_multiply(v_new, m_b.mT, m_a.mT).to(point.dtype)
            momentum_map = m_b @ momentum_map @ m_a.mT  # J' = M_A^T J M_B
        healthy = healthy & torch.isfinite(v_new).flatten(-2).all(-1)
        healthy = healthy & torch.isfinite(new).flatten(-2).all(-1)
        self.state[p]["momentum_map"] = momentum_map
        return new, v_new, kinetic, healthy

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

Integrator (generalized leapfrog / Stormer-Verlet for a non-separable :math:`H`, symplectic,
time-reversible, second order; its implicit stages are solved by ``implicit_iterations`` fixed-point
sweeps), step :math:`h` = ``lr``:

.. math::

    p_{n+1/2} &= p_n - \tfrac{h}{2}\,[\nabla L(Z_n) + \partial_Z T(Z_n, p_{n+1/2})] \\
    Z_{n+1} &= Z_n + \tfrac{h}{2}\,[\partial_p T(Z_n, p_{n+1/2}) + \partial_p T(Z_{n+1}, p_{n+1/2})] \\
    p_{n+1} &= e^{-\gamma h}\,\big(p_{n+1/2} - \tfrac{h}{2}\,[\nabla L(Z_{n+1}) + \partial_Z T(Z_{n+1}, p_{n+1/2})]\big)

The last half-kick needs :math:`\nabla L(Z_{n+1})`, so it runs at the start of the next
``step()``. ``friction`` :math:`\gamma = 0` is the frictionless mode (it conserves :math:`H` up to
:math:`O(h^2)` without drift); :math:`\gamma > 0` is conformal-symplectic descent (:math:`H`
decays, :math:`J = 0` is kept). Because every stage is GL(k)-equivariant, the trajectory of
products does not depend on the starting factorization. Plain tensors run the same leapfrog with
kinetic energy :math:`\tfrac12 \|p\|^2` (which is separable, so it is explicit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from quotientopt.distributed import steps_local_shards
from quotientopt.linalg import compute_dtype
from quotientopt.manifolds.protocol import HeadGeometry
from quotientopt.optim._base import (
    NONFINITE_POLICIES,
    HealthMixin,
    KeepStateDtypes,
    Momentum,
    check_choice,
    check_number,
    found_nonfinite,
    geometry_of,
    is_quotient_parameter,
    manifold_of,
    where_heads,
)


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


class QuotientHamiltonian(KeepStateDtypes, HealthMixin, torch.optim.Optimizer):
    r"""Symplectic Hamiltonian dynamics for the heads (see the module docstring for the equations).

    Args:
        params: parameters or parameter groups.
        lr: the time step :math:`h`.
        friction: :math:`\gamma \ge 0`; 0 is frictionless (energy-conserving), > 0 descends.
        implicit_iterations: fixed-point sweeps for each implicit stage (>= 1).
        on_nonfinite: as for :class:`~quotientopt.optim.QuotientSGD` (``"skip"``, ``"warn"``,
            ``"raise"``); a skipped step leaves positions and momenta untouched.

    After each completed leapfrog step the momentum is mapped back onto the reduced phase space
    :math:`J = 0` (its velocity replaced by the horizontal part): the exact scheme conserves
    :math:`J`, and this removes what the finite fixed-point iterations leave.

    ``mode="ecd"`` replaces the leapfrog by energy-conserving descent (see :meth:`_ecd_group`):
    unit-speed motion whose direction turns towards :math:`-g` at a rate
    :math:`\propto 1/(F - F_0)`, with ``eta`` and ``loss_floor`` :math:`F_0`; it needs
    ``step(closure)``.

    Quotient parameters must live on ``FactorQuotient(metric="preconditioned", damping=0)``; plain
    tensors follow the Euclidean leapfrog. Between steps ``state[p]["velocity"]`` holds the velocity
    of :math:`p_{n+1/2}` at the current point (for plain tensors, :math:`p_{n+1/2}` itself);
    ``state[p]["momentum_map"]`` the momentum map :math:`J(Z_n, p_n)`, and :meth:`kinetic_energy`
    the kinetic energy :math:`T(Z_n, p_n)`, of the last step.
    """

    # restored in float32 or better by load_state_dict (KeepStateDtypes)
    full_precision_state = ("kinetic", "momentum_map")

    def _full_precision_keys(self, p: torch.Tensor) -> tuple[str, ...]:
        return self.full_precision_state  # the kinetic energy is float64 for plain tensors too

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        friction: float = 0.0,
        *,
        mode: str = "hamiltonian",
        eta: float = 1.0,
        loss_floor: float = 0.0,
        implicit_iterations: int = 3,
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        check_number("friction", friction, 0.0, float("inf"))
        check_choice("mode", mode, ("hamiltonian", "ecd"))
        check_number("eta", eta, 0.0, float("inf"), low_open=True)
        check_number("loss_floor", loss_floor, -float("inf"), float("inf"))
        if not isinstance(implicit_iterations, int) or implicit_iterations < 1:
            raise ValueError(
                f"invalid implicit_iterations: {implicit_iterations!r}; expected an int >= 1"
            )
        check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)
        super().__init__(
            params,
            dict(
                lr=lr,
                friction=friction,
                mode=mode,
                eta=eta,
                loss_floor=loss_floor,
                implicit_iterations=implicit_iterations,
            ),
        )
        for group in self.param_groups:
            for p in group["params"]:
                self._check_parameter(p)
        self.on_nonfinite = on_nonfinite
        self._init_health()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        for p in self.param_groups[-1]["params"]:
            self._check_parameter(p)

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
        """The momentum at ``p``: the velocity of :math:`p_{n+1/2}` (a tangent vector) for head
        parameters, the Euclidean momentum for the others; None before the first step."""
        velocity = self.state[p].get("velocity") if p in self.state else None
        if velocity is None:
            return None
        return Momentum(velocity, "vector" if is_quotient_parameter(p) else "covector")

    def kinetic_energy(self) -> torch.Tensor:
        """Total kinetic energy :math:`T(Z_n, p_n)` at the start of the last step (a tensor)."""
        total = torch.zeros((), dtype=torch.float64)
        for group in self.param_groups:
            for p in group["params"]:
                t = self.state[p].get("kinetic")
                if t is not None:
                    total = total + t.to(total.device, torch.float64).sum()
        return total

    @steps_local_shards
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One leapfrog step (``closure`` re-evaluates the model and returns the loss)."""
        loss, grads = self._closure_and_grads(closure)
        if not grads:
            return loss
        nonfinite = found_nonfinite(grads)
        pending = []
        for group in self.param_groups:
            if group["mode"] == "ecd":
                if loss is None:
                    raise ValueError(
                        "QuotientHamiltonian(mode='ecd') needs the loss value: call "
                        "optimizer.step(closure) with a closure that returns the loss"
                    )
                pending += self._ecd_group(group, loss.detach(), nonfinite)
                continue
            h, damping = group["lr"], math.exp(-group["friction"] * group["lr"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                keep = nonfinite[p.device] == 0
                if is_quotient_parameter(p):
                    pending.append(
                        (
                            p,
                            *self._quotient_leapfrog(
                                p, p.grad, h, damping, group["implicit_iterations"]
                            ),
                            keep,
                        )
                    )
                else:
                    pending.append((p, *self._euclidean_leapfrog(p, p.grad, h, damping), keep))
        self._enforce_policy(
            nonfinite, [healthy for *_, healthy, _ in pending if healthy is not None]
        )
        for p, new, half, kinetic, healthy, keep in pending:
            state = self.state[p]
            old_half = state.get("velocity")
            ok = keep if healthy is None else keep & healthy
            if old_half is None:
                old_half = torch.zeros_like(half)
            if healthy is None:
                p.copy_(torch.where(ok, new, p))
                state["velocity"] = torch.where(ok, half, old_half)
            else:
                where_heads(ok, new, p.detach(), out=p.detach())
                state["velocity"] = where_heads(ok, half, old_half)
                self._count(self._rank_skips, p.device, (~healthy & keep).sum())
            if kinetic is not None:
                state["kinetic"] = kinetic
        for device, flag in nonfinite.items():
            self._count(self._nonfinite_steps, device, flag)
        return loss

    def _ecd_group(self, group: dict, loss: torch.Tensor, nonfinite: dict) -> list:
        r"""Energy-conserving descent on the quotient (the unit-speed ECD variant of paper 003):

        .. math::

            v &\leftarrow \frac{v - \delta\,(g - v\, \langle v, g\rangle)}{\|\cdot\|},\quad
                \delta = \frac{\Delta t\, \eta\, d}{2 (d - 1) (F - F_0)},\quad
                \Delta t = \frac{\mathrm{lr}}{\sqrt{\eta}} \\
            \theta &\leftarrow R_\theta(\Delta t\, v), \qquad
                v \leftarrow \mathrm{proj}^h_{\theta}(v) / \|\cdot\|

        with :math:`g` the Riemannian gradient (horizontal), inner products and norms in the
        preconditioned metric for quotient parameters and Euclidean for the others, summed over
        the group, and :math:`d` the dimension of the group's quotient. The speed is fixed, so
        the step slows where :math:`F - F_0` is large relative to the gradient and the dynamics
        concentrates at low loss. :math:`F - F_0` is floored at ``1e-12``.
        """
        params = [p for p in group["params"] if p.grad is not None]
        dt = group["lr"] / math.sqrt(group["eta"])
        dims = 0
        for p in params:
            if is_quotient_parameter(p):
                heads = p[..., 0, 0].numel()
                dims += heads * (p.shape[-2] - p.shape[-1]) * p.shape[-1]
            else:
                dims += p.numel()
        gap = (loss.double() - group["loss_floor"]).clamp_min(1e-12)
        delta = dt * group["eta"] * dims / (2 * max(dims - 1, 1)) / gap
        grads, velocities, grams = [], [], []
        for p in params:
            z = p.detach()
            if is_quotient_parameter(p):
                gram = p.manifold.grams(z, check=False)
                grads.append(p.manifold.egrad2rgrad(z, p.grad, grams=gram))
            else:
                gram = None
                grads.append(p.grad)
            grams.append(gram)
            velocities.append(self.state[p].get("velocity"))

        def inner(p, gram, u, v):
            if gram is None:
                return (u.double() * v.double()).sum()
            return p.manifold.inner(p.detach(), u, v, grams=gram).double().sum()

        if any(v is None for v in velocities):  # start downhill
            norm = sum(
                inner(p, gm, g, g) for p, gm, g in zip(params, grams, grads, strict=True)
            ).sqrt()
            velocities = [-g / norm.clamp_min(1e-30).to(g.dtype) for g in grads]
        along = sum(
            inner(p, gm, v, g) for p, gm, v, g in zip(params, grams, velocities, grads, strict=True)
        )
        velocities = [
            v - delta.to(v.dtype) * (g - v * along.to(v.dtype))
            for v, g in zip(velocities, grads, strict=True)
        ]
        norm = sum(
            inner(p, gm, v, v) for p, gm, v in zip(params, grams, velocities, strict=True)
        ).sqrt()
        velocities = [v / norm.to(v.dtype) for v in velocities]
        moved, transported, new_grams = [], [], []
        for p, v in zip(params, velocities, strict=True):
            z = p.detach()
            if is_quotient_parameter(p):
                new = p.manifold.retr(z, dt * v)
                gram = p.manifold.grams(new, check=False)
                v = p.manifold.proju(new, v, grams=gram)
            else:
                new, gram = z + dt * v, None
            moved.append(new)
            transported.append(v)
            new_grams.append(gram)
        norm = sum(
            inner(p, gm, v, v)
            if gm is None
            else p.manifold.inner(new, v, v, grams=gm).double().sum()
            for p, gm, v, new in zip(params, new_grams, transported, moved, strict=True)
        ).sqrt()
        out = []
        for p, new, v, gram in zip(params, moved, transported, new_grams, strict=True):
            keep = nonfinite[p.device] == 0
            if gram is not None:
                keep = keep & gram.ok.all()
            out.append((p, new, v / norm.to(v.dtype), None, None, keep))
        return out

    def _quotient_leapfrog(self, p, grad, h, damping, iterations):
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
        carried = self.state[p].get("velocity")
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

    def _euclidean_leapfrog(self, p, grad, h, damping):
        x = p.detach()
        half = self.state[p].get("velocity")
        momentum = torch.zeros_like(x) if half is None else damping * (half - 0.5 * h * grad)
        kinetic = 0.5 * (momentum.double() ** 2).sum()
        half = momentum - 0.5 * h * grad
        return x + h * half, half, kinetic, None

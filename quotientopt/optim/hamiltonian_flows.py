r"""The two integrators of :class:`~quotientopt.optim.QuotientHamiltonian` as pure head kernels
(equations in :mod:`quotientopt.optim.hamiltonian`): :func:`splitting_update`, the exact flows
of the kinetic parts, and :func:`implicit_update`, the generalized leapfrog, each wrapped in a
small integrator object (:class:`Splitting`, :class:`Implicit`) that reads the optimizer's state
for it. Nothing here writes a parameter or a state entry; the step loop does."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from quotientopt.linalg import compute_dtype, spd_cholesky_flagged, tril_inverse
from quotientopt.manifolds.protocol import Balancing, Grams, HeadGeometry, RowSharded
from quotientopt.optim._base import HeadUpdate, WriteLog, work_buffers

__all__ = ["FactorGram", "Implicit", "Splitting", "implicit_update", "splitting_update"]


class FactorGram(NamedTuple):
    r"""The Gram :math:`G = X^\top X` of one factor (``(..., k, k)``, float32 or better, summed
    over row shards), its Cholesky factor and inverse (the identity's where not ``ok``) and the
    per-head flag. Stored in ``state[p]["grams"]`` as a plain tuple per factor (0: A, 1: B)."""

    gram: torch.Tensor
    chol: torch.Tensor
    inv: torch.Tensor
    ok: torch.Tensor


def factor_gram(
    geometry: HeadGeometry, z: torch.Tensor, which: int, reference: torch.Tensor | None = None
) -> FactorGram:
    """:class:`FactorGram` of factor ``which`` of ``z`` from the geometry's ``factor_gram`` (a
    flow moves one factor, so only its Gram is formed: ``grams`` would form both)."""
    gram = geometry.factor_gram(z, which)
    inverse, chol, ok = _spd_inverse(gram, reference)
    return FactorGram(gram, chol, inverse, ok)


def _spd_inverse(gram: torch.Tensor, reference: torch.Tensor | None = None):
    """``(G^{-1}, L, ok)``: :func:`quotientopt.optim.hamiltonian.spd_inverse` and the Cholesky
    factor (the identity where not ``ok``)."""
    chol, ok = spd_cholesky_flagged(gram, reference)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.where(ok[..., None, None], chol, eye)
    x = tril_inverse(chol)
    return x.mT @ x, chol, ok


def regularized(grams: tuple[FactorGram, FactorGram]) -> tuple[tuple, torch.Tensor]:
    r"""For heads whose Grams are not both regular (a rank-deficient start): the Cholesky
    factors and inverses of :math:`G + \delta I`, :math:`\delta = 0.1\,(\mathrm{tr}\,Q +
    \mathrm{tr}\,P) / 2k` (1 where both vanish), the rule of ``FactorQuotient.grams(...,
    regularize=True)`` applied to the factor Grams the flows carry; and the flag of the heads it
    regularized. The kinetic flow of a factor moves it along the range of its momentum, which
    lies in the range of the other factor's Gram, so this moves such a head onto the full-rank
    set (not GL(k)-equivariantly), where the exact flow takes over."""
    a, b = grams
    ok = a.ok & b.ok
    k = a.gram.shape[-1]
    scale = a.gram.diagonal(dim1=-2, dim2=-1).sum(-1) + b.gram.diagonal(dim1=-2, dim2=-1).sum(-1)
    scale = scale / (2 * k)
    delta = torch.where(scale > 0, 0.1 * scale, torch.ones_like(scale))[..., None, None]
    eye = torch.eye(k, dtype=a.gram.dtype, device=a.gram.device)
    out, usable, mask = [], ~ok, ok[..., None, None]
    for g in grams:
        damped = g.gram + delta * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        usable = usable & (info == 0) & torch.isfinite(damped).flatten(-2).all(-1)
        x = tril_inverse(torch.where((info == 0)[..., None, None], chol, eye))
        inv = torch.where(mask, g.inv, x.mT @ x)
        out.append(FactorGram(g.gram, torch.where(mask, g.chol, chol), inv, g.ok))
    return tuple(out), usable


def add_right_product(out: torch.Tensor, x: torch.Tensor, mat: torch.Tensor, alpha: float) -> None:
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


def contract(geometry: HeadGeometry, like: torch.Tensor, v: torch.Tensor, which: int):
    r""":math:`V^\top V` for the factor-shaped ``v`` of factor ``which``, summed over row
    shards (through the protocol's ``cross`` when the rows are sharded)."""
    if not isinstance(geometry, RowSharded):
        return v.mT @ v
    full = torch.zeros_like(like)
    geometry.factors(full)[which].copy_(v)
    return geometry.cross(full, full)[which]


def diagnostics(geometry: HeadGeometry, z, m, grams: tuple[FactorGram, FactorGram], work=None):
    r""":math:`T = \tfrac12 \langle p, p\,G^{-1}\rangle` per head and the group's momentum
    map :math:`J` of :math:`p` (``geometry.momentum_map`` of its velocity). ``work``: a
    tensor shaped like ``z`` that may receive the velocity."""
    a, b = grams
    metric = Grams(b.gram, a.gram, b.chol, a.chol, a.ok & b.ok, b.inv, a.inv)
    velocity = geometry.egrad2rgrad(z, m, grams=metric, out=work)
    if isinstance(geometry, RowSharded):
        kinetic = 0.5 * geometry.inner(z, velocity, grams=metric)
    else:  # one dot product per head as a batched (1 x N) @ (N x 1): no full-size temporary
        dot = m.flatten(-2).unsqueeze(-2) @ velocity.flatten(-2).unsqueeze(-1)
        kinetic = 0.5 * dot[..., 0, 0]
    return kinetic, geometry.momentum_map(z, velocity, grams=metric)


def _at_rest(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:math:`T = 0` and :math:`J = 0` per head of ``z`` (``p_n = 0``), in ``z``'s dtype."""
    heads, k = z.shape[:-2], z.shape[-1]
    zeros = torch.zeros((*heads, k, k), dtype=z.dtype, device=z.device)
    return zeros[..., 0, 0].clone(), zeros


class SplittingUpdate(NamedTuple):
    """What :func:`splitting_update` proposes for one head tensor; nothing is written."""

    point: torch.Tensor  # Z_{n+1} in float32 or better
    momentum: torch.Tensor  # the momentum after the kinetic flows
    grams: tuple[FactorGram, FactorGram]  # of Z_{n+1}
    start: tuple[FactorGram, FactorGram]  # of Z_n, as the step used them (regularized)
    ok: torch.Tensor  # (...,) bool
    regularized: torch.Tensor  # (...,) bool: heads that took the regularized metric
    kinetic: torch.Tensor | None  # T(Z_n, p_n) per head (with diagnostics)
    charge: torch.Tensor | None  # J(Z_n, p_n) per head (with diagnostics)


def splitting_update(
    z: torch.Tensor,
    grad: torch.Tensor,
    momentum: torch.Tensor | None,
    grams: tuple[FactorGram, FactorGram],
    geometry: HeadGeometry,
    *,
    h: float,
    damping: float,
    parity: int,
    diagnose: bool,
    work: tuple[torch.Tensor, ...],
) -> SplittingUpdate:
    r"""One step of the splitting integrator, batched over the heads (nothing written):

    .. math::

        p &\leftarrow e^{-\gamma h} (\tilde p - \tfrac h2 \nabla L) - \tfrac h2 \nabla L
            \quad (p = -\tfrac h2 \nabla L \text{ on the first step}), \\
        V_A &= p_A P^{-1},\quad A \leftarrow A + h V_A,\quad p_B \leftarrow p_B + h\, B\, V_A^\top V_A,
        \\ V_B &= p_B Q^{-1},\quad B \leftarrow B + h V_B,\quad p_A \leftarrow p_A + h\, A\, V_B^\top V_B

    (:math:`T_A`'s flow, then :math:`T_B`'s; the other order for odd ``parity``). ``z``,
    ``grad``, ``momentum`` (:math:`\tilde p`, None at first) ``(..., n + m, k)``; ``grams``: of
    ``z``; ``work``: the new point's and momentum's buffers (like ``z``, float32 or better) and a
    velocity buffer per factor. ``diagnose``: also :math:`T`, :math:`J` at :math:`(Z_n, p_n)`."""
    dtype = compute_dtype(z.dtype)
    zc, g = z.to(dtype), grad.to(dtype)
    start, regular = regularized(grams)
    new, m, *velocities = work
    kinetic = charge = None
    if momentum is None:  # p_n = 0
        m = torch.mul(g, -0.5 * h, out=m)
        if diagnose:
            kinetic, charge = _at_rest(zc)
    else:  # p_n = e^{-gamma h} (p~ - h/2 g) ends the last step, p_n - h/2 g starts this one
        m = torch.mul(momentum.to(dtype), damping, out=m)
        m.add_(g, alpha=-0.5 * h * damping)
        if diagnose:
            kinetic, charge = diagnostics(geometry, zc, m, start, work=new)
        m.add_(g, alpha=-0.5 * h)
    order = (0, 1) if parity == 0 else (1, 0)  # T_A then T_B, or T_B then T_A
    grams, healthy = _kinetic_flows(geometry, zc, new, m, (start, regular), h, order, velocities)
    return SplittingUpdate(new, m, tuple(grams), start, healthy, regular, kinetic, charge)


def _kinetic_flows(geometry, z, new, m, start, h, order, velocities):
    r"""The exact flows of :math:`T_X` for ``h``, factor by factor in ``order``, from ``z`` into
    ``new`` with the momentum ``m`` updated in place; ``start``: the factor Grams of ``z`` (as
    the step uses them) and the flag of the heads on the regularized metric. Returns the factor
    Grams of ``new`` and the per-head flag that the step may be written."""
    grams, regular = list(start[0]), start[1]
    current, moved, momenta = list(geometry.factors(z)), geometry.factors(new), geometry.factors(m)
    healthy = (grams[0].ok & grams[1].ok) | regular
    for x in order:
        y = 1 - x
        v = torch.matmul(momenta[x], grams[y].inv, out=velocities[x])  # V_X = p_X G_Y^{-1}
        torch.add(current[x], v, alpha=h, out=moved[x])  # X += h V_X
        current[x] = moved[x]
        s = contract(geometry, m, v, x)  # V_X^T V_X
        add_right_product(momenta[y], current[y], s, h)  # p_Y += h Y V_X^T V_X
        grams[x] = factor_gram(geometry, new, x, reference=grams[x].gram)
        # a head that started rank-deficient only has to stay finite on its way to full rank
        healthy = healthy & (grams[x].ok | regular) & torch.isfinite(s).flatten(-2).all(-1)
    return tuple(grams), healthy


class Splitting:
    """The splitting integrator (the default): :func:`splitting_update` with the momentum
    ``state["momentum"]`` and the factor Grams cached in ``state["grams"]``."""

    def __init__(self, work: WriteLog, warn_if_rank_deficient) -> None:
        self.work = work
        self.warn_if_rank_deficient = warn_if_rank_deficient

    def update(self, p, geometry, state, keep, h, damping, diagnose) -> HeadUpdate:
        z = p.detach()
        dtype = compute_dtype(z.dtype)
        old = state.get("momentum")
        if old is None and "velocity" in state:  # switched from the implicit integrator
            metric = geometry.grams(z, check=False)
            old = geometry.right_multiply(state.pop("velocity").to(dtype), metric.p, metric.q)
        cache = state.get("grams")
        if cache is None or state.get("grams_version") != (z._version, z.data_ptr()):
            grams = tuple(factor_gram(geometry, z.to(dtype), w) for w in (0, 1))
        else:
            grams = tuple(FactorGram(*cache[w]) for w in (0, 1))
        update = splitting_update(
            z, p.grad, old, grams, geometry,
            h=h, damping=damping, parity=state.get("step", 0) % 2, diagnose=diagnose,
            work=self._buffers(p, dtype, geometry),
        )  # fmt: skip
        if state.get("step", 0) == 0:
            self.warn_if_rank_deficient(update.regularized)
        return HeadUpdate(
            update.point,
            {"momentum": update.momentum.to(z.dtype), "grams": _as_state(update.grams)},
            update.ok & keep,
            kept={"grams": _as_state(update.start)},
            aux=(update.kinetic, update.charge),
        )

    def _buffers(self, p, dtype, geometry) -> tuple[torch.Tensor, ...]:
        """The new point, the momentum (shaped like ``p``) and one contiguous velocity buffer per
        factor, reused on every step (:func:`~quotientopt.optim._base.work_buffers`)."""
        point, momentum = work_buffers(self.work, p, 2, dtype)
        velocities = [
            work_buffers(self.work, p, 1, dtype, key=f"velocity{w}", shape=f.shape)[0]
            for w, f in enumerate(geometry.factors(point))
        ]
        return point, momentum, *velocities

    @staticmethod
    def stepped(p: torch.Tensor, state: dict, aux: Any) -> None:
        kinetic, charge = aux
        state["step"] = state.get("step", 0) + 1
        state["grams_version"] = (p._version, p.data_ptr())
        if kinetic is not None:
            state["kinetic"] = kinetic
            state["momentum_map"] = charge


def _as_state(grams: tuple[FactorGram, FactorGram]) -> dict[int, tuple]:
    """The factor Grams as ``state["grams"]`` keeps them: ``{0: (G, L, G^{-1}, ok), 1: ...}``."""
    return {w: tuple(grams[w]) for w in (0, 1)}


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
    correction = torch.cat((va.to(dtype) @ delta(b, db), vb.to(dtype) @ delta(a, da)), dim=-2)
    return v - manifold.egrad2rgrad(y, correction.to(v.dtype), grams=grams)


def _balanced_frame(geometry: HeadGeometry, z: torch.Tensor):
    """The balancing move ``(M_A, M_B)`` of ``z`` with the identity for heads that have none
    (rank-deficient), or None (row-sharded sectors, groups without one)."""
    frame = geometry.balancing_element(z) if isinstance(geometry, Balancing) else None
    if frame is None:
        return None
    m_a, m_b = frame
    finite = (torch.isfinite(m_a) & torch.isfinite(m_b)).flatten(-2).all(-1)[..., None, None]
    eye = torch.eye(m_a.shape[-1], dtype=m_a.dtype, device=m_a.device)
    return torch.where(finite, m_a, eye), torch.where(finite, m_b, eye)


def implicit_update(point, grad, carried, geometry: HeadGeometry, *, h, damping, iterations):
    r"""The generalized leapfrog in velocity variables :math:`v = \partial_p T` (module docs of
    :mod:`quotientopt.optim.hamiltonian`), nothing written; returns
    ``(Z_{n+1}, v_{n+1}, T_n, J_n, ok)``. Forces are raised like gradients, and a velocity moves
    from :math:`Z_n` to :math:`Z_{n+1}` by :func:`transfer`.

    The step is computed at the balanced representative :math:`Z M` of the point
    (``balancing_element``, the :class:`Balancing` capability; none without it) and carried back
    by :math:`M^{-1}`: every stage is
    GL(k)-equivariant, so this is the same step in exact arithmetic, while in floating point the
    Grams it inverts are as well conditioned as the product allows (1e-11 over 200 frictionless
    float64 steps at :math:`\kappa(G) = 1000`, against 1.4e-10 in the parameter's own
    representative). Row-sharded sectors step in their own representative."""
    z, frame = point, _balanced_frame(geometry, point)
    if frame is not None:  # in float32 or better; vectors move like points, gradients inversely
        m_a, m_b = frame
        z = geometry.right_multiply(z.to(m_a.dtype), m_a, m_b)
        grad = geometry.right_multiply(grad.to(m_a.dtype), m_b, m_a)
        if carried is not None:
            carried = geometry.right_multiply(carried.to(m_a.dtype), m_a, m_b)
    grams = geometry.grams(z, check=False)

    def force(v):  # raised [grad L + dT/dZ](Z_n, v)
        return geometry.egrad2rgrad(z, grad + geometry.kinetic_force(z, v), grams=grams)

    v_n = torch.zeros_like(z)
    if carried is not None:  # finish the previous step at Z_n, then stay on J = 0
        v_n = geometry.proju(z, damping * (carried - 0.5 * h * force(carried)), grams=grams)
    charge = geometry.momentum_map(z, v_n, grams=grams)
    kinetic = 0.5 * geometry.inner(z, v_n, grams=grams)
    v_half = v_n
    for _ in range(iterations):  # v_{n+1/2} = v_n - h/2 force(v_{n+1/2})
        v_half = v_n - 0.5 * h * force(v_half)
    increment = h * v_half
    for _ in range(iterations):  # Z_{n+1} = Z_n + h/2 [v_{n+1/2} + transfer(v_{n+1/2})]
        increment = 0.5 * h * (v_half + transfer(geometry, z, z + increment, v_half))
    new = z + increment
    v_new = transfer(geometry, z, new, v_half)
    # a step too large for the implicit stage diverges: such heads keep their point
    ok = geometry.grams(new, check=False, reference=grams).ok & grams.ok
    if frame is not None:  # back to the parameter's representative: M^{-1} = (M_B^T, M_A^T)
        # only the increment is carried back and added, so a point at rest stays bitwise put
        new = point + geometry.right_multiply(increment, m_b.mT, m_a.mT).to(point.dtype)
        v_new = geometry.right_multiply(v_new, m_b.mT, m_a.mT).to(point.dtype)
        charge = m_b @ charge @ m_a.mT  # J' = M_A^T J M_B
    ok = ok & torch.isfinite(v_new).flatten(-2).all(-1) & torch.isfinite(new).flatten(-2).all(-1)
    return new, v_new, kinetic, charge, ok


class Implicit:
    """The implicit integrator: :func:`implicit_update` with ``iterations`` fixed-point sweeps per
    stage; its state is the velocity ``state["velocity"]`` (converting it to and from a
    covector each step would invert the Grams of the parameter's own representative, which is
    what it avoids)."""

    def __init__(self, iterations: int) -> None:
        self.iterations = iterations

    def update(self, p, geometry, state, keep, h, damping, diagnose) -> HeadUpdate:
        z = p.detach()
        old = state.get("velocity")
        if old is None and "momentum" in state:  # switched from the splitting integrator
            grams = geometry.grams(z, check=False)
            old = geometry.egrad2rgrad(z, state.pop("momentum"), grams=grams)
        new, v_new, kinetic, charge, ok = implicit_update(
            z, p.grad, old, geometry, h=h, damping=damping, iterations=self.iterations
        )
        return HeadUpdate(new, {"velocity": v_new}, ok & keep, aux=(kinetic, charge))

    @staticmethod
    def stepped(p: torch.Tensor, state: dict, aux: Any) -> None:
        state["kinetic"], state["momentum_map"] = aux
        state.pop("grams", None)

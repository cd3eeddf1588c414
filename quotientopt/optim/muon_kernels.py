r"""The pure k x k and whitening kernels of :mod:`quotientopt.optim.muon`: the polar factor from
a Gram (:func:`polar_right_factor`), the block, all-heads and tangent step matrices, and the
triangular solves they are built from. Nothing here reads optimizer state or options beyond the
``polar`` dict (``method``, ``eps``, ``ns_coefficients``, ``ns_steps``); the precision policy
(:func:`quotientopt.optim.muon.polar_route`) and the step loop stay in ``muon.py``, which
re-exports every name defined here. The formulas and their derivations: the ``muon`` module docs
and ``docs/quotient_muon.md``.
"""

from __future__ import annotations

import torch
from torch.optim import _muon as torch_muon_module

from quotientopt.linalg import sym

__all__ = ["NS_COEFFICIENTS", "polar_right_factor"]

NS_COEFFICIENTS = (
    torch_muon_module.DEFAULT_A,
    torch_muon_module.DEFAULT_B,
    torch_muon_module.DEFAULT_C,
)


def polar_right_factor(
    s: torch.Tensor,
    method: str = "newton-schulz",
    *,
    eps: float = 1e-7,
    ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    ns_steps: int = 5,
) -> torch.Tensor:
    r"""The ``k x k`` matrix :math:`M` with :math:`\operatorname{polar}(X) \approx X M`, from the
    Gram :math:`S = X^\top X` alone (``(..., k, k)``, symmetric PSD, float32 or better).

    * ``"eigh"``: :math:`M = c^{-1/2} f(S / c)` with :math:`c = \operatorname{tr} S + \text{eps}`
      and :math:`f(\lambda) = (\lambda + \text{eps})^{-1/2}` through ``torch.linalg.eigh``: the
      exact polar factor for singular values above :math:`\sqrt{\text{eps}}\,\|X\|_F`;
    * ``"newton-schulz"``: Muon's quintic iteration on :math:`X_0 = X / (\|X\|_F + \text{eps})`,
      carried out on ``k x k`` matrices (:math:`M_{t+1} = M_t p(S_t)`,
      :math:`S_{t+1} = S_t p(S_t)^2`): the same approximate polar factor (singular values roughly
      in ``[0.7, 1.2]``) as ``torch.optim.Muon`` computes from ``X``, in float32 or better.

    Both are spectral functions of :math:`S`: :math:`M(O^\top S O) = O^\top M(S) O` for orthogonal
    :math:`O`, which is what makes the quotient step equivariant. A zero ``X`` gives a finite
    :math:`M` (and :math:`X M = 0`).
    """
    k = s.shape[-1]
    trace = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    if method == "eigh":
        c = trace + eps
        lam, vec = _eigh(s / c)
        f = (lam.clamp_min(0) + eps).rsqrt()
        return (vec * f[..., None, :]) @ vec.mT * c.rsqrt()
    a, b, c2 = ns_coefficients
    norm = trace.clamp_min(0).sqrt() + eps
    s_t = s / norm.square()
    eye = torch.eye(k, dtype=s.dtype, device=s.device)
    m = eye / norm
    for _ in range(ns_steps):
        poly = a * eye + b * s_t + c2 * (s_t @ s_t)
        m = m @ poly
        s_t = sym(s_t @ poly @ poly)
    return m


def _polar_bfloat16(x: torch.Tensor, polar: dict) -> torch.Tensor:
    r""":math:`\operatorname{polar}(X)` of ``x`` (``(..., rows, Hk)``) by torch Muon's own
    bfloat16 quintic Newton-Schulz (``_zeropower_via_newtonschulz``, one call per matrix, as
    torch Muon calls it per parameter), returned in ``x``'s dtype."""
    flat = x.reshape(-1, *x.shape[-2:])
    out = [
        torch_muon_module._zeropower_via_newtonschulz(
            matrix, polar["ns_coefficients"], polar["ns_steps"], polar["eps"]
        )
        for matrix in flat.unbind(0)
    ]
    return torch.stack(out).reshape(x.shape).to(x.dtype)


def _lsolve(chol: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:math:`L^{-1} X` for lower triangular ``chol``."""
    return torch.linalg.solve_triangular(chol, x, upper=False)


def _rsolve(x: torch.Tensor, chol: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    r""":math:`X L^{-1}` (or :math:`X L^{-\top}` with ``transpose``) for lower triangular ``chol``."""
    if transpose:
        return torch.linalg.solve_triangular(chol.mT, x, upper=True, left=False)
    return torch.linalg.solve_triangular(chol, x, upper=False, left=False)


def _block_matrices(geometry, update: torch.Tensor, grams, polar: dict) -> torch.Tensor:
    r"""The block step's :math:`(K_A, K_B)` (``(..., 2, k, k)``) with
    :math:`\Delta A = -G_A K_A`, :math:`K_A = L_P^{-\top} M(S_A) L_P^{-1}`,
    :math:`S_A = L_P^{-1} G_A^\top G_A L_P^{-\top}` (and :math:`B` with :math:`L_Q`)."""
    chol = torch.stack((grams.chol_p, grams.chol_q), dim=-3)  # A is whitened by P, B by Q
    c = torch.stack(geometry.cross(update, update), dim=-3)  # (G_A^T G_A, G_B^T G_B)
    s = sym(_lsolve(chol, _rsolve(c, chol, transpose=True)))
    m = polar_right_factor(s, **polar)
    return _rsolve(torch.linalg.solve_triangular(chol.mT, m, upper=True), chol)


def _across_heads_block_step(
    geometry, update: torch.Tensor, grams, polar: dict, route: str, head_shards=None
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The block step in the spectral norm of all heads' product changes side by side
    (``head_norm="all-heads"``): the directions :math:`(D_A, D_B)`, :math:`\Delta A = -\eta c_A
    D_A`, of a head tensor ``(..., H, n + m, k)``, the heads on axis -3.

    With :math:`X = [G_{A,1} L_{P,1}^{-\top}, \dots, G_{A,H} L_{P,H}^{-\top}]` (``n x Hk``),
    :math:`Y = \operatorname{polar}(X) = [D_{A,h} L_{P,h}]_h` (:func:`_polar_side_by_side`, by
    ``route``: see :func:`quotientopt.optim.muon.polar_route`), so :math:`D_{A,g} = Y_g L_{P,g}^{-1}`; symmetrically
    for :math:`B` with :math:`L_Q`. The whitening is ``k x k`` per head. ``head_shards`` (a
    :class:`quotientopt.optim._sharded_muon.HeadShards`, for a tensor whose heads are split over
    ranks) gathers :math:`X` whole before the polar and keeps this rank's heads of :math:`Y`."""
    dtype = grams.p.dtype
    sides = []
    eye = torch.eye(update.shape[-1], dtype=dtype, device=update.device)
    usable = grams.ok if grams.regularized is None else grams.ok | grams.regularized
    for g, chol in zip(geometry.factors(update), (grams.chol_p, grams.chol_q), strict=True):
        # L_h^{-1} (k x k per head) once: (rows x k) @ (k x k) products are several times
        # faster than right-sided triangular solves on the CPU
        inverse = _lsolve(chol, eye)
        x = g.to(dtype) @ inverse.mT  # X_h = G_h L_h^{-T}, (..., H, rows, k)
        # a head the step cannot use (non-finite factors: its Cholesky factors are stand-ins)
        # must not steer the others' polar: it enters as X_h = 0 (and is skipped itself)
        x = torch.where(usable[..., None, None], x, 0.0)
        if head_shards is not None:
            x = head_shards.gather(x)
        y = _polar_side_by_side(geometry, x, polar, route)
        if head_shards is not None:
            y = head_shards.local(y)
        sides.append(y @ inverse)  # D_g = Y_g L_g^{-1}
    return sides[0], sides[1]


def _polar_side_by_side(geometry, x: torch.Tensor, polar: dict, route: str) -> torch.Tensor:
    r""":math:`\operatorname{polar}(X)` of :math:`X = [X_1, \dots, X_H]` given as its blocks
    ``x`` (``(..., H, rows, k)``), returned as blocks. ``route="bf16-x"``: torch Muon's
    bfloat16 iteration on the ``rows x Hk`` matrix itself; otherwise :math:`Y = X M` with
    :math:`M = M(S)` from the Gram :math:`S = X^\top X` (``Hk x Hk``, blocks
    :math:`X_h^\top X_g` summed over row shards) by :func:`polar_right_factor` in ``x``'s
    precision (float32 or better)."""
    heads, k = x.shape[-3], x.shape[-1]
    if route == "bf16-x":
        flat = x.transpose(-3, -2).flatten(-2)  # (..., rows, H k)
        return _polar_bfloat16(flat, polar).unflatten(-1, (heads, k)).transpose(-3, -2)
    s = geometry.row_sum(torch.einsum("...hri,...grj->...hgij", x, x))  # X_h^T X_g
    s = sym(s.transpose(-3, -2).flatten(-2, -1).flatten(-3, -2))  # (..., Hk, Hk)
    m = polar_right_factor(s, **(polar | {"method": route}))
    m = m.unflatten(-1, (heads, k)).unflatten(-3, (heads, k)).transpose(-3, -2)
    return torch.einsum("...hri,...hgij->...grj", x, m)  # polar(X), head g's block


def _eigh(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``torch.linalg.eigh`` of symmetric ``s`` (``(..., k, k)``) that never raises on a NaN/Inf
    matrix: those get the eigenvalues NaN (and eigenvectors I), so the step built from them is
    non-finite and the non-finite policy skips it."""
    finite = torch.isfinite(s).flatten(-2).all(-1)[..., None, None]
    eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
    lam, vec = torch.linalg.eigh(torch.where(finite, s, eye))
    return torch.where(finite[..., 0], lam, torch.nan), vec


def _root_and_pinv(s: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`S^{1/2}` and the regularized :math:`S^{+1/2}` (:math:`\sqrt\lambda/(\lambda +
    \text{eps}\,\operatorname{tr} S)`) of symmetric PSD ``s``, through ``eigh`` (spectral
    functions: they commute with rotations)."""
    c = s.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(0) + 1e-30
    lam, vec = _eigh(s / c)
    root = lam.clamp_min(0).sqrt()
    pinv = root / (lam.clamp_min(0) + eps)
    build = lambda f: (vec * f[..., None, :]) @ vec.mT  # noqa: E731
    return build(root) * c.sqrt(), build(pinv) / c.sqrt()


def _tangent_matrices(geometry, z, update, grams, polar: dict):
    r"""The joint (tangent-space) step: :math:`\Delta W = -\operatorname{polar}(P_T E)`
    restricted to the tangent space of the rank-k matrices, lifted horizontally; returned as
    ``(K on the update, K on the point)``, each ``(..., 2, k, k)``, with
    :math:`\Delta A = -(G_A K_1 + A K_2)`, :math:`\Delta B = -(G_B K_3 + B K_4)`
    (derivation: ``docs/quotient_muon.md``)."""
    lp, lq = grams.chol_p, grams.chol_q
    ga_ga, gb_gb = geometry.cross(update, update)
    a_ga, b_gb = geometry.cross(z, update)
    c1 = _lsolve(lq, _rsolve(a_ga, lp, transpose=True))  # U^T X_A
    c2 = _lsolve(lp, _rsolve(b_gb, lq, transpose=True))  # V^T X_B
    s_a = sym(_lsolve(lp, _rsolve(ga_ga, lp, transpose=True)) - c1.mT @ c1)  # Y_A^T Y_A
    s_b = sym(_lsolve(lq, _rsolve(gb_gb, lq, transpose=True)) - c2.mT @ c2)
    eps = polar["eps"]
    root_a, pinv_a = _root_and_pinv(s_a, eps)
    root_b, pinv_b = _root_and_pinv(s_b, eps)
    core = torch.cat(
        (
            torch.cat((0.5 * (c1 + c2.mT), root_b), dim=-1),
            torch.cat((root_a, torch.zeros_like(root_a)), dim=-1),
        ),
        dim=-2,
    )  # rows [U, Q_1], columns [V, Q_2]
    pol = core @ polar_right_factor(core.mT @ core, **polar)
    k = lp.shape[-1]
    a, b, c = pol[..., :k, :k], pol[..., :k, k:], pol[..., k:, :k]
    pc, pb = pinv_a @ c, pinv_b @ b.mT
    k1 = _rsolve(_rsolve(pc.mT, lp).mT, lp)  # L_P^{-T} R_A^+ c L_P^{-1}
    k2 = _rsolve(
        _rsolve((0.5 * a - c1 @ pc).mT, lq).mT, lp
    )  # L_Q^{-T} (a/2 - C_1 R_A^+ c) L_P^{-1}
    k3 = _rsolve(_rsolve(pb.mT, lq).mT, lq)
    k4 = _rsolve(_rsolve((0.5 * a.mT - c2 @ pb).mT, lp).mT, lq)
    return torch.stack((k1, k3), dim=-3), torch.stack((k2, k4), dim=-3)

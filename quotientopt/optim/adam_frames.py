r"""The frames of QuotientAdam (:mod:`quotientopt.optim.adam`): the triangular factors
:math:`R` of :math:`A = U_A R_A`, :math:`B = U_B R_B` (:class:`Basis`, with Householder
:class:`Frames` for a fresh start), their update from ``k x k`` data (:func:`advance_bases`) and
the ``k x k`` functions of the second moment (:func:`adam_root`,
:func:`trace_preserving_transport`)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from quotientopt.linalg import compute_dtype, sym_funm, tril_inverse
from quotientopt.manifolds.protocol import Grams, HeadGeometry

__all__ = [
    "Basis",
    "Frames",
    "adam_root",
    "advance_bases",
    "stacked_cross",
    "trace_preserving_transport",
]


def stacked_cross(geometry: HeadGeometry, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r""":math:`[X_A^\top Y_A,\ X_B^\top Y_B]` (``(..., 2, k, k)``, summed over row shards): the
    geometry's ``cross`` stacked."""
    return torch.stack(geometry.cross(x, y), dim=-3)


def adam_root(v: torch.Tensor, eps: float) -> torch.Tensor:
    r""":math:`(V^{1/2} + \epsilon I)^{-1}` for symmetric PSD ``v`` of shape ``(..., k, k)``.

    Through the eigendecomposition, so it commutes with every rotation of the frame:
    :math:`f(O^\top V O) = O^\top f(V) O`. Negative rounding-level eigenvalues are clamped to 0.
    """
    return sym_funm(v, lambda lam: 1.0 / (lam.clamp_min(0).sqrt() + eps))


def trace_preserving_transport(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    r""":math:`T V T^\top + \frac{\mathrm{tr}\, V - \mathrm{tr}(T V T^\top)}{k} I` (``(..., k, k)``)."""
    moved = t @ v @ t.transpose(-1, -2)
    lost = v.diagonal(dim1=-2, dim2=-1).sum(-1) - moved.diagonal(dim1=-2, dim2=-1).sum(-1)
    k = v.shape[-1]
    return moved + (lost / k)[..., None, None] * torch.eye(k, dtype=v.dtype, device=v.device)


def right_solve_upper(x: torch.Tensor, r: torch.Tensor, *, upper: bool = True) -> torch.Tensor:
    r""":math:`X R^{-1}` for triangular ``r`` (``(..., k, k)``), backward stable."""
    return torch.linalg.solve_triangular(r, x, upper=upper, left=False)


class Frames(NamedTuple):
    r"""Orthonormal frames of a factor pair: thin QR factorizations :math:`A = U_A R_A`,
    :math:`B = U_B R_B` (``U`` of shape ``(..., rows, k)``, ``R`` upper triangular ``k x k``), in
    float32 or better, and a per-head flag ``ok``.

    Householder QR is backward stable, so the frames are orthonormal to working precision and
    their error is of order :math:`\varepsilon\,\kappa(B)`, against :math:`\varepsilon\,\kappa(B)^2`
    for frames built from the Gram's Cholesky factor (which cost the invariance two digits at
    :math:`\kappa(G) = 10^3`). Any frame works for the invariance, whatever the sign convention of
    the QR: two orthonormal bases of one column space differ by an orthogonal matrix.
    """

    u_a: torch.Tensor
    r_a: torch.Tensor
    u_b: torch.Tensor
    r_b: torch.Tensor
    scale: torch.Tensor  # (..., 2): the largest squared column norm of A and of B
    ok: torch.Tensor  # (...,): both factors finite and of full column rank to working precision

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor, reference: Frames | None = None) -> Frames:
        """The frames of ``(a, b)``; ``reference`` (the previous point's) flags a factor that
        collapsed in one step, as :func:`quotientopt.linalg.spd_cholesky_flagged` does."""
        dtype = compute_dtype(a.dtype)
        u_a, r_a = torch.linalg.qr(a.to(dtype))
        u_b, r_b = torch.linalg.qr(b.to(dtype))
        r = torch.stack((r_a, r_b), dim=-3)
        scale = (r * r).sum(-2).amax(-1)  # column norms of A, B are those of R_A, R_B
        if reference is not None:
            scale = torch.maximum(scale, reference.scale)
        k = a.shape[-1]
        pivots = torch.diagonal(r, dim1=-2, dim2=-1) ** 2
        regular = pivots.amin(-1) > 4 * k * torch.finfo(dtype).eps * scale
        ok = (regular & torch.isfinite(r).flatten(-3).all(-1)[..., None]).all(-1)
        return cls(u_a, r_a, u_b, r_b, scale, ok)


class Basis(NamedTuple):
    r"""The triangular factors :math:`R` of a factor pair, :math:`A = U_A R_A`,
    :math:`B = U_B R_B` with orthonormal :math:`U`, stacked ``[R_A, R_B]`` (``(..., 2, k, k)``,
    upper triangular, float32 or better), their inverses and a per-head flag ``ok``.

    The frames :math:`U = X R^{-1}` themselves are never formed: every quantity of the step is a
    product of a factor (or gradient) with a ``k x k`` matrix. The first step (or a step after an
    outside write to the parameter) takes :math:`R` from Householder QR (:meth:`of`); every later
    step updates it by :func:`advance_bases`, a Cholesky QR preconditioned by the previous
    :math:`R`.
    """

    r: torch.Tensor
    r_inv: torch.Tensor
    ok: torch.Tensor  # (...,)

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> Basis:
        """From the Householder QR of ``(a, b)`` (see :class:`Frames`)."""
        frames = Frames.of(a, b)
        r = torch.stack((frames.r_a, frames.r_b), dim=-3)
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        return cls(r, torch.linalg.solve_triangular(r, eye, upper=True), frames.ok)

    @classmethod
    def of_row_shards(cls, manifold: HeadGeometry, z: torch.Tensor, grams: Grams) -> Basis:
        r"""For a row-sharded sector (each process holds some rows of :math:`A` and :math:`B`),
        where Householder QR would need whole factors: Cholesky QR twice (CholeskyQR2), from
        ``k x k`` data summed over the row shards.

        :math:`R_0 = [L_Q^\top, L_P^\top]` from the Cholesky factors of the reduced Grams
        ``grams`` (:math:`Q = A^\top A`, :math:`P = B^\top B`, ``(..., k, k)``), then
        :math:`W = X R_0^{-1}` per factor (row-local, orthonormal up to
        :math:`\varepsilon\,\kappa(X)^2`) and its Gram :math:`H = W^\top W` summed over the
        shards (``row_sum``), :math:`H = L L^\top` and :math:`R = L^\top R_0`
        (:func:`advance_bases`): the frames keep Householder QR's accuracy while
        :math:`\kappa(X)^2 \varepsilon \ll 1`, and :math:`R^\top R = X^\top X` exactly (the damping
        of ``grams`` drops out). :math:`R` is identical on every shard; it may differ from
        Householder's by the signs of its rows, a rotation of the frame, which the step does not
        see. ``ok``: ``grams.ok``, the second Cholesky factorization succeeded and the pivots pass
        :meth:`restore`'s test."""
        r0 = torch.stack((grams.chol_q.mT, grams.chol_p.mT), dim=-3)
        eye = torch.eye(r0.shape[-1], dtype=r0.dtype, device=r0.device)
        r0_inv = torch.linalg.solve_triangular(r0, eye, upper=True)
        w = manifold.right_multiply(z.to(r0.dtype), r0_inv[..., 0, :, :], r0_inv[..., 1, :, :])
        h = stacked_cross(manifold, w, w)
        r, r_inv, _, ok = advance_bases(r0, r0_inv, h, h)
        return cls(r, r_inv, grams.ok & ok.all(-1) & cls.restore(r, r_inv).ok)

    @classmethod
    def restore(cls, r: torch.Tensor, r_inv: torch.Tensor) -> Basis:
        r"""From stored factors; ``ok`` as in :meth:`Frames.of`: finite, and every pivot
        :math:`R_{ii}^2` above :math:`4 k \varepsilon` times the largest squared column norm."""
        k = r.shape[-1]
        pivots = torch.diagonal(r, dim1=-2, dim2=-1) ** 2
        scale = (r * r).sum(-2).amax(-1)
        regular = pivots.amin(-1) > 4 * k * torch.finfo(r.dtype).eps * scale
        finite = torch.isfinite(r).flatten(-2).all(-1) & torch.isfinite(r_inv).flatten(-2).all(-1)
        return cls(r, r_inv, (regular & finite).all(-1))


def advance_bases(
    r: torch.Tensor, r_inv: torch.Tensor, h: torch.Tensor, cross: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""The triangular factors of the new point and the transport between the frames, from
    ``k x k`` data only (all arguments ``(..., k, k)``, one matrix per factor).

    With :math:`X = U R` the old factor, :math:`X_+` the new one and
    :math:`W = X_+ R^{-1}` (orthonormal up to the step), the caller supplies
    :math:`H = W^\top W` and :math:`K = W^\top X`. With :math:`H = L L^\top` (Cholesky):

    .. math:: R_+ = L^\top R, \qquad R_+^{-1} = R^{-1} L^{-\top}, \qquad
              T = U_+^\top U = L^{-1} K R^{-1},

    since :math:`U_+ = W L^{-\top}` and :math:`U = X R^{-1}`. This is Cholesky QR of :math:`W`,
    not of :math:`X_+`: its Gram has condition number :math:`\kappa(W)^2 \approx 1`, so the
    factors keep the accuracy of Householder QR (error :math:`\varepsilon\,\kappa(X)`, from
    forming :math:`W`) instead of Cholesky QR's :math:`\varepsilon\,\kappa(X)^2`. Under a
    re-factorization every output rotates: :math:`W \mapsto W O`,
    :math:`L \mapsto O^\top L O_+`, :math:`R_+ \mapsto O_+^\top R_+ G`, :math:`T \mapsto O_+^\top T O`.

    Returns ``(r_new, r_inv_new, t, ok)``, ``ok`` of shape ``(...)``: the Cholesky factorization
    succeeded, everything is finite and the smallest pivot :math:`L_{ii}^2` is above
    :math:`4 k \varepsilon \max(1, \max_i H_{ii})` (the old frame has unit columns, so a factor
    that collapsed in one step counts as rank loss too).
    """
    k = h.shape[-1]
    chol, info = torch.linalg.cholesky_ex(h)
    chol_inv = tril_inverse(chol)  # batched matmuls; LAPACK's solve is one call per matrix
    r_new = chol.mT @ r
    r_inv_new = r_inv @ chol_inv.mT
    t = chol_inv @ cross @ r_inv
    pivots = torch.diagonal(chol, dim1=-2, dim2=-1) ** 2
    scale = torch.diagonal(h, dim1=-2, dim2=-1).amax(-1).clamp_min(1.0)
    finite = torch.isfinite(h).flatten(-2).all(-1) & torch.isfinite(cross).flatten(-2).all(-1)
    ok = (info == 0) & finite & (pivots.amin(-1) > 4 * k * torch.finfo(h.dtype).eps * scale)
    return r_new, r_inv_new, t, ok

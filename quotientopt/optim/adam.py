r"""QuotientAdam: Adam-type adaptivity for the heads whose trajectory of products is exactly
independent of the factorization (in the spirit of LoRA-RITE, Yen et al., ICLR 2025).

Why Adam breaks the symmetry: its second moment is elementwise in the coordinates of :math:`A` and
:math:`B`, and those coordinates are the arbitrary factorization. The construction below keeps
every adaptive statistic in a frame that only rotates under a re-factorization.

**Frames.** For :math:`Z = [A; B]` let :math:`A = U_A R_A`, :math:`B = U_B R_B` with orthonormal
:math:`U` (``rows x k``) and upper triangular :math:`R` (``k x k``). Under
:math:`Z \mapsto (A G, B G^{-\top})` the frames rotate, :math:`U_A \mapsto U_A O_A`,
:math:`U_B \mapsto U_B O_B` (any two orthonormal bases of one column space differ by a rotation),
and :math:`R_A \mapsto O_A^\top R_A G`, :math:`R_B \mapsto O_B^\top R_B G^{-\top}`. Only the
:math:`R` are kept (:class:`Basis`); the :math:`U` are never formed. The first step takes them
from Householder QR, every later step from :func:`advance_bases`: Cholesky QR of the nearly
orthonormal :math:`W = X_+ R^{-1}`, as accurate as Householder QR and made of matmuls.

**Unmagnified gradients** (the gradient of :math:`W = AB^\top` seen through the frame, with
:math:`E = \nabla_W f`):

.. math:: \bar G_A = \nabla_A f \, R_B^{-1} = E\, U_B, \qquad
          \bar G_B = \nabla_B f \, R_A^{-1} = E^\top U_A  \qquad (n \times k,\ m \times k).

**Moments in the frame** (one side shown; :math:`t` counts steps):

.. math::

    M_t &= \beta_1 M_{t-1} + (1 - \beta_1) \bar G_t, \qquad
    V_t = \beta_2 V_{t-1} + (1 - \beta_2) \bar G_t^\top \bar G_t \quad (k \times k), \\
    S_t &= \frac{M_t}{1 - \beta_1^t}
           \Big( \big(\tfrac{V_t}{1 - \beta_2^t}\big)^{1/2} + \epsilon I \Big)^{-1}, \qquad
    A_{t+1} = A_t - \eta\, S_t R_B^{-\top} \quad (\text{so } \Delta W = -\eta\, S_t U_B^\top),

and likewise :math:`B_{t+1} = B_t - \eta S^B_t R_A^{-\top}`. The matrix root acts on the ``k x k``
second moment, so adaptivity mixes directions only inside the frame, where it is a rotation.

**Transport between frames.** After the step the frames move to those of :math:`Z_{t+1}`; the
moments follow by the projection :math:`T = U_+^\top U = R_{B+}^{-\top} B_+^\top B\, R_B^{-1}`:

.. math:: M \leftarrow M T^\top, \qquad
          V \leftarrow T V T^\top + \frac{\operatorname{tr} V - \operatorname{tr}(T V T^\top)}{k} I .

The second term puts the trace that the projection dropped back isotropically (LoRA-RITE's
"escaped mass" in its simplest invariant form), so a rotating subspace never makes the
preconditioner smaller and the step larger.

**Invariance.** Every quantity above transforms as :math:`\bar G \mapsto \bar G O`,
:math:`M \mapsto M O`, :math:`V \mapsto O^\top V O`, :math:`T \mapsto O_+^\top T O`, and the matrix
function commutes with :math:`O`; hence :math:`S_t R_B^{-\top} \mapsto S_t R_B^{-\top} G` and the products
:math:`A_t B_t^\top` do not depend on the representative the run starts from (in exact
arithmetic; tested to 1e-10 in float64 at ``cond(G) = 1000``).

**Weight decay** is decoupled (as AdamW) and has a quotient meaning: ``"product"`` scales the point
by :math:`1 - \eta\lambda` (the Riemannian gradient of :math:`\tfrac12\|AB^\top\|_F^2` in the
preconditioned metric, so :math:`W \mapsto (1-\eta\lambda)^2 W`), ``"nuclear"`` steps along the
Riemannian gradient of :math:`\|AB^\top\|_*`. Neither is the representative-dependent factor decay.

State per head: :math:`M` (``(n + m) x k``, the size of the parameter), two ``k x k`` second
moments, the two :math:`R` and their inverses (``frame``, ``frame_inv``) and a step count:
:math:`(n + m)k + 6k^2 + 1` numbers against AdamW's :math:`2(n + m)k`.

**Cost.** Per factor and step: seven ``(rows x k) @ (k x k)``-sized products (the unmagnified
gradient, its Gram, the step fused with the decay in one ``baddbmm``, :math:`W`, :math:`W^\top W`,
:math:`W^\top X`, the transport of :math:`M`), no QR and no triangular solve over the rows. The
``k x k`` work (the matrix roots by ``eigh``, the Cholesky factorizations, the transports) runs as
one batched call per group of tensors with equal ``k``, dtype and device, over all their heads.
The full-size temporaries (the unmagnified gradient, then :math:`W` and the transported first
moment; the new first moment; the new point) live in three work buffers per head tensor that are
allocated once (:func:`~quotientopt.optim._base.work_buffers`), and the stored first moment is
updated in place, as torch's Adam keeps its moment tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch.optim.adam import adam as torch_adam

from quotientopt.linalg import compute_dtype, sym_funm, tril_inverse
from quotientopt.manifolds.protocol import Grams, HeadGeometry
from quotientopt.optim._base import (
    Momentum,
    QuotientOptimizer,
    WriteLog,
    check_choice,
    check_number,
    geometry_of,
    manifold_of,
    where_heads,
    work_buffers,
)
from quotientopt.optim.sgd import WEIGHT_DECAY_MODES


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
        w = _right_multiply(z.to(r0.dtype), r0_inv, manifold.n)
        h = manifold.row_sum(_side_products(w, w, manifold.n))
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


def _right_multiply(
    x: torch.Tensor, c: torch.Tensor, n: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    r""":math:`[X_A C_0;\ X_B C_1]` for ``x`` of shape ``(..., n + m, k)`` (rows ``:n`` are
    :math:`X_A`) and ``c`` ``(..., 2, k, k)``; one batched product when ``n == m``, then written
    into ``out`` (a contiguous tensor shaped like ``x``, of ``c``'s dtype) when given."""
    if x.shape[-2] == 2 * n:
        halves = x.unflatten(-2, (2, n))
        if out is not None and out.is_contiguous() and out.dtype == c.dtype == x.dtype:
            torch.matmul(halves, c, out=out.view(halves.shape))
            return out
        return (halves @ c).flatten(-3, -2)
    return torch.cat((x[..., :n, :] @ c[..., 0, :, :], x[..., n:, :] @ c[..., 1, :, :]), dim=-2)


def _side_products(x: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    r""":math:`[X_A^\top Y_A,\ X_B^\top Y_B]` (``(..., 2, k, k)``) for ``x``, ``y`` of shape
    ``(..., n + m, k)``; one batched product when ``n == m``."""
    if x.shape[-2] == 2 * n:
        return x.unflatten(-2, (2, n)).mT @ y.unflatten(-2, (2, n))
    sides = (slice(None, n), slice(n, None))
    return torch.stack([x[..., s, :].mT @ y[..., s, :] for s in sides], dim=-3)


def _add_right_product(
    x: torch.Tensor,
    m: torch.Tensor,
    c: torch.Tensor,
    n: int,
    beta: float,
    alpha: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    r""":math:`\beta X + \alpha\, [M_A C_0;\ M_B C_1]` (shapes as :func:`_right_multiply`), as
    ``baddbmm`` calls over the flattened batch (one when ``n == m``, written into ``out``, a
    contiguous tensor shaped like ``m`` of its dtype, when given)."""
    k = m.shape[-1]
    if out is not None and m.shape[-2] == 2 * n and out.is_contiguous() and out.dtype == m.dtype:
        batch = m.shape[:-2].numel() * 2
        torch.baddbmm(
            x.reshape(batch, n, k),
            m.reshape(batch, n, k),
            c.reshape(batch, k, k),
            beta=beta,
            alpha=alpha,
            out=out.view(batch, n, k),
        )
        return out

    def fused(x_, m_, c_, rows):
        batch = m_.shape[:-2].numel()  # explicit: a row shard may hold no row of a factor
        out = torch.baddbmm(
            x_.reshape(batch, rows, k),
            m_.reshape(batch, rows, k),
            c_.reshape(batch, k, k),
            beta=beta,
            alpha=alpha,
        )
        return out.reshape(m_.shape)

    if m.shape[-2] == 2 * n:
        return fused(x.unflatten(-2, (2, n)), m.unflatten(-2, (2, n)), c, n).flatten(-3, -2)
    rows = m.shape[-2] - n
    return torch.cat(
        (
            fused(x[..., :n, :], m[..., :n, :], c[..., 0, :, :], n),
            fused(x[..., n:, :], m[..., n:, :], c[..., 1, :, :], rows),
        ),
        dim=-2,
    )


def _batched(tensors: list[torch.Tensor], dims: int) -> tuple[torch.Tensor, list]:
    """``tensors`` with their batch dims (all but the last ``dims``) flattened and concatenated,
    and what :func:`_unbatched` needs to split the result back."""
    shapes = [t.shape[: t.dim() - dims] for t in tensors]
    flat = [t.reshape((-1, *t.shape[t.dim() - dims :])) for t in tensors]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)), shapes


def _unbatched(x: torch.Tensor, shapes: list, dims: int) -> list[torch.Tensor]:
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return [
        part.reshape((*s, *x.shape[x.dim() - dims :]))
        for part, s in zip(x.split(sizes), shapes, strict=True)
    ]


@torch.compiler.disable
def _stored_frame(state: dict, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(state[p]["frame"], state[p]["frame_inv"])`` or None, looked up eagerly: under
    ``torch.compile`` a traced lookup in a dict keyed by tensors can return another parameter's
    entry (see :class:`~quotientopt.optim._base.WriteLog`)."""
    entry = state.get(p)
    if entry is None or "frame" not in entry:
        return None
    return entry["frame"], entry["frame_inv"]


class QuotientAdam(QuotientOptimizer):
    r"""Adam on the head quotients, exactly invariant under re-factorization (see the module docs).

    Args:
        params: parameters or parameter groups, as for ``torch.optim.AdamW``.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)``.
        eps: :math:`\epsilon > 0`, added to the square root of the second moment.
        weight_decay: decoupled decay :math:`\lambda \ge 0`. On quotient parameters its meaning is
            set by ``weight_decay_mode`` (``"product"`` or ``"nuclear"``, as in
            :class:`~quotientopt.optim.QuotientSGD`); on other parameters it is AdamW's.
        weight_decay_mode: ``"product"`` or ``"nuclear"``.
        maximize: maximize the objective instead.
        on_nonfinite: ``"skip"`` (default, no host synchronisation), ``"warn"`` or ``"raise"``,
            as in :class:`~quotientopt.optim.QuotientSGD`: a NaN/Inf gradient skips the whole step,
            a head update that would lose rank skips that head (its factors, moments and step
            count are kept).

    Quotient parameters (``geoopt.ManifoldParameter`` on
    :class:`~quotientopt.manifolds.FactorQuotient`) take the invariant step, batched over every
    head of the tensor with its ``k x k`` algebra in float32 or better (moments are stored in that
    dtype); parameters on other geoopt manifolds take geoopt's ``RiemannianAdam`` step; plain
    tensors take torch's fused AdamW step. The frames come from the factors' own Grams, so the
    manifold's ``metric`` does not enter the step (its ``damping`` does, through the Grams).

    The eigendecomposition of the ``k x k`` second moments (``torch.linalg.eigh``) checks
    convergence on CUDA, which is one host synchronisation per step and group of tensors with
    equal ``k`` (one call over all their heads).
    """

    # restored in float32 or better by load_state_dict (KeepStateDtypes)
    full_precision_state = ("exp_avg", "exp_avg_sq", "step", "frame", "frame_inv")
    state_in_compute_dtype = True  # the step's algebra runs in compute_dtype(p.dtype) throughout

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_decay_mode: str = "product",
        maximize: bool = False,
        on_nonfinite: str = "skip",
    ) -> None:
        check_number("lr", lr, 0.0, float("inf"))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"invalid betas: {betas!r}; expected a pair (beta1, beta2)")
        check_number("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_number("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_number("eps", eps, 0.0, float("inf"), low_open=True)
        check_number("weight_decay", weight_decay, 0.0, float("inf"))
        check_choice("weight_decay_mode", weight_decay_mode, WEIGHT_DECAY_MODES)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            maximize=maximize,
        )
        self._log = WriteLog()
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._log = WriteLog()  # loaded frames are trusted to be those of the current point

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        r"""The first moment at ``p`` as the tangent vector it moves the point along: for head
        parameters :math:`(M_A R_B^{-\top}, M_B R_A^{-\top})` (the frame coordinates mapped back
        to the factors, before the second-moment preconditioning; it transforms as
        :math:`v \mapsto v G`), for the others AdamW's Euclidean ``exp_avg``. None before the
        first step."""
        exp_avg = self.state[p].get("exp_avg") if p in self.state else None
        if exp_avg is None:
            return None
        geometry = geometry_of(p)
        if geometry is None:
            return Momentum(exp_avg, "covector")
        r_inv = self._basis(p, geometry).r_inv
        vector = _right_multiply(exp_avg, r_inv.flip(-3).mT, geometry.n)
        return Momentum(vector.to(p.dtype), "vector")

    # ----------------------------------------------------------------------------- helpers
    def _basis(self, p: torch.Tensor, manifold: HeadGeometry) -> Basis:
        """The triangular factors of ``p``: from the state (``frame``, ``frame_inv``, written by
        the last step or restored by ``load_state_dict``) while ``p`` is unmodified, else from a
        Householder QR (the first step, or after an outside write to ``p``).

        They are state, not a cache: the moments live in the frames they define, and a frame
        updated by :func:`advance_bases` depends on the path, not only on the point."""
        stored = _stored_frame(self.state, p)
        if stored is not None and not self._log.modified_elsewhere(p):
            return Basis.restore(*stored)
        z = p.detach()
        grams = manifold.grams(z, check=False, regularize=True)
        if manifold.is_row_sharded:  # no Householder QR of a factor split over processes
            basis = Basis.of_row_shards(manifold, z, grams)
        else:
            basis = Basis.of(*manifold.factors(z))
        return self._regularized(basis, grams)

    def _regularized(self, basis: Basis, grams: Grams) -> Basis:
        r"""For heads that are rank-deficient at a fresh start (a zero-initialized factor):
        triangular factors of the regularized Grams, :math:`R^\top R = X^\top X + \delta I`
        (``grams(..., regularize=True)``), flagged ok, so that the head takes a regularized step
        onto the full-rank set instead of being skipped; the frames of the new point are then
        exact (:func:`advance_bases` gives :math:`R_+^\top R_+ = X_+^\top X_+`). Warns once.
        ``grams``: the point's, from ``grams(..., check=False, regularize=True)``."""
        regularized = grams.regularized & ~basis.ok
        self._warn_if_rank_deficient(regularized)
        r = torch.stack((grams.chol_q.mT, grams.chol_p.mT), dim=-3).to(basis.r.dtype)
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        r_inv = torch.linalg.solve_triangular(r, eye, upper=True)
        mask = regularized[..., None, None, None]
        return Basis(
            torch.where(mask, r, basis.r),
            torch.where(mask, r_inv, basis.r_inv),
            basis.ok | regularized,
        )

    def _quotient_moments(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> dict:
        """Phase 1 for one head tensor: unmagnified gradients, the new moments and the
        bias-corrected second moment (nothing written)."""
        manifold = geometry_of(p)
        z = p.detach()
        dtype = compute_dtype(z.dtype)
        beta1, beta2 = group["betas"]
        basis = self._basis(p, manifold)
        state = self.state[p]
        batch, k = z.shape[:-2], z.shape[-1]
        if "exp_avg" in state:
            exp_avg, exp_avg_sq, step = state["exp_avg"], state["exp_avg_sq"], state["step"]
        else:
            exp_avg = torch.zeros(z.shape, dtype=dtype, device=z.device)
            exp_avg_sq = torch.zeros((*batch, 2, k, k), dtype=dtype, device=z.device)
            step = torch.zeros(batch, dtype=dtype, device=z.device)
        # unmagnified gradients: grad_A R_B^{-1} = E U_B and grad_B R_A^{-1} = E^T U_A
        n = manifold.n
        grad = grad.to(dtype)
        if group["maximize"]:
            grad = -grad
        # full-size temporaries in reused buffers: the gradient (later W and the transported
        # first moment), the first moment, the new point
        work = work_buffers(self._log, p, 3, dtype)
        g = _right_multiply(grad, basis.r_inv.flip(-3), n, out=work[0])
        m = torch.lerp(exp_avg, g, 1 - beta1, out=work[1])
        v = torch.lerp(exp_avg_sq, manifold.row_sum(_side_products(g, g, n)), 1 - beta2)
        new_step = step + 1
        # a head with a non-finite moment (NaN/Inf gradient, or a rank-deficient frame) is
        # discarded later; give eigh a harmless matrix there, or it fails to converge
        finite = basis.ok & torch.isfinite(v).flatten(-3).all(-1)
        eye = torch.eye(k, dtype=dtype, device=z.device)
        v_hat = torch.where(
            finite[..., None, None, None], v / (1 - beta2**new_step)[..., None, None, None], eye
        )
        return dict(
            p=p,
            manifold=manifold,
            group=group,
            basis=basis,
            m=m,
            v=v,
            v_hat=v_hat,
            step=new_step,
            old=(exp_avg, exp_avg_sq, step),
            work=work,
        )

    def _quotient_point(self, job: dict, root: torch.Tensor) -> torch.Tensor:
        r"""Phase 3: the candidate point and the Grams of its preconditioned factors.

        ``root`` (``(..., 2, k, k)``) is
        :math:`(\hat V^{1/2} + \epsilon I)^{-1} / (1 - \beta_1^t)`.
        The step :math:`\Delta A = M_A\, \mathrm{root}_A R_B^{-\top}` is one product with a
        ``k x k`` matrix, fused with the decay into one ``baddbmm``. Then
        :math:`W = X_+ R^{-1}` per factor (nearly orthonormal) and its Grams
        :math:`H = W^\top W`, :math:`K = W^\top X` (stored in ``job``)."""
        p, manifold, group, basis = job["p"], job["manifold"], job["group"], job["basis"]
        z = p.detach()
        dtype = compute_dtype(z.dtype)
        lr = group["lr"]
        r_inv = basis.r_inv
        # the k x k maps from the frame's momentum to the factor's step: root_A R_B^{-T}
        step_maps = root @ r_inv.flip(-3).mT
        base, scale = z, 1.0
        if group["weight_decay"]:
            decay = lr * group["weight_decay"]
            if group["weight_decay_mode"] == "product":
                scale = 1 - decay  # the preconditioned Riemannian gradient of |AB^T|^2 / 2
            else:
                unchecked = manifold.grams(z, check=False)  # bad heads are caught later
                base = z.to(dtype) - decay * manifold.decay_rgrad(z, "nuclear", unchecked).to(dtype)
        n = manifold.n
        work = job["work"]
        new = _add_right_product(
            base.to(dtype), job["m"], step_maps, n, scale, -lr, out=work[2]
        ).to(z.dtype)
        w = _right_multiply(new.to(dtype), r_inv, n, out=work[0])
        h, cross = _side_products(w, w, n), _side_products(w, z.to(dtype), n)
        if manifold.is_row_sharded:  # sums over the rows: one all-reduce for both
            h, cross = manifold.row_sum(torch.stack((h, cross))).unbind(0)
        job["new"] = new
        job["h"], job["cross"] = h, cross
        return new

    def _manifold_update(self, p: torch.Tensor, grad: torch.Tensor, group: dict):
        """geoopt RiemannianAdam's step for a parameter on another geoopt manifold (nothing written)."""
        manifold = p.manifold
        z = p.detach()
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if group["maximize"]:
            grad = -grad
        if group["weight_decay"]:
            grad = grad.add(z, alpha=group["weight_decay"])
        rgrad = manifold.egrad2rgrad(z, grad)
        exp_avg = state.get("exp_avg", torch.zeros_like(z))
        exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(manifold.component_inner(z, rgrad)))
        step = state.get("step", torch.zeros((), device=z.device)) + 1
        exp_avg = torch.lerp(exp_avg, rgrad, 1 - beta1)
        exp_avg_sq = torch.lerp(exp_avg_sq, manifold.component_inner(z, rgrad), 1 - beta2)
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt().add_(group["eps"])
        direction = exp_avg / (1 - beta1**step) / denom
        new, exp_avg = manifold.retr_transp(z, -group["lr"] * direction, exp_avg)
        return new, (exp_avg, exp_avg_sq, step)

    # -------------------------------------------------------------------------------- step
    def _quotient_steps(self, jobs: list[dict], keep: dict) -> None:
        """Phases 1-4 for every head tensor: the ``k x k`` algebra (the matrix roots, the new
        triangular factors, the transports) runs once per group of tensors with the same ``k``,
        dtype and device (concatenated over their heads), the ``n x k`` products per tensor."""
        groups: dict[tuple, list[dict]] = {}
        for job in jobs:
            v = job["v_hat"]
            groups.setdefault((v.shape[-1], v.dtype, v.device, job["group"]["eps"]), []).append(job)
        for (_, _, _, eps), members in groups.items():
            flat, shapes = _batched([job["v_hat"] for job in members], 3)
            roots = _unbatched(adam_root(flat, eps), shapes, 3)
            for job, root in zip(members, roots, strict=True):
                beta1 = job["group"]["betas"][0]
                self._quotient_point(job, root / (1 - beta1 ** job["step"])[..., None, None, None])
            r, shapes = _batched([job["basis"].r for job in members], 3)
            r_inv, _ = _batched([job["basis"].r_inv for job in members], 3)
            h, _ = _batched([job["h"] for job in members], 3)
            cross, _ = _batched([job["cross"] for job in members], 3)
            v, _ = _batched([job["v"] for job in members], 3)
            r_new, r_inv_new, t, ok = advance_bases(r, r_inv, h, cross)
            # the A side's moments live in B's frame and vice versa
            v_new = trace_preserving_transport(v, t.flip(-3))
            parts = zip(
                *(_unbatched(x, shapes, 3) for x in (r_new, r_inv_new, t, v_new)),
                _unbatched(ok.all(-1), shapes, 0),
                strict=True,
            )
            for job, (r_j, r_inv_j, t_j, v_j, ok_j) in zip(members, parts, strict=True):
                n = job["manifold"].n
                m_new = _right_multiply(job["m"], t_j.flip(-3).mT, n, out=job["work"][0])
                job["moments"] = (m_new, v_j, job["step"])
                job["new_basis"] = Basis(r_j, r_inv_j, ok_j)
                job["ok"] = job["basis"].ok & ok_j & keep[job["p"].device]

    def _step(self, nonfinite: dict[torch.device, torch.Tensor], loss: torch.Tensor | None) -> None:
        keep = {device: flag == 0 for device, flag in nonfinite.items()}

        # every quotient and manifold update, computed and checked, nothing written
        jobs, manifold_pending = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if geometry_of(p) is not None:
                    jobs.append(self._quotient_moments(p, p.grad, group))
                elif manifold_of(p) is not None:
                    new, moments = self._manifold_update(p, p.grad, group)
                    manifold_pending.append((p, new, moments, keep[p.device]))
        self._quotient_steps(jobs, keep)
        self._enforce_policy(nonfinite, [job["ok"] for job in jobs])

        # write
        for p, new, moments, ok in manifold_pending:
            state = self.state[p]
            exp_avg, exp_avg_sq, step = moments
            state["exp_avg"] = torch.where(ok, exp_avg, state.get("exp_avg", 0 * exp_avg))
            state["exp_avg_sq"] = torch.where(
                ok, exp_avg_sq, state.get("exp_avg_sq", 0 * exp_avg_sq)
            )
            state["step"] = torch.where(ok, step, step - 1)
            p.copy_(torch.where(ok, new, p))
        for job in jobs:
            p, ok = job["p"], job["ok"]
            state = self.state[p]
            exp_avg, *rest = job["moments"]
            old_exp_avg, *old_rest = job["old"]
            # in place, as torch's Adam keeps its moment tensors (the new one is in a work buffer)
            state["exp_avg"] = where_heads(ok, exp_avg, old_exp_avg, out=old_exp_avg)
            for name, value, previous in zip(("exp_avg_sq", "step"), rest, old_rest, strict=True):
                state[name] = where_heads(ok, value, previous)
            where_heads(ok, job["new"], p.detach(), out=p.detach())
            state["frame"] = where_heads(ok, job["new_basis"].r, job["basis"].r)
            state["frame_inv"] = where_heads(ok, job["new_basis"].r_inv, job["basis"].r_inv)
            self._log.record(p)
            self._count(self._rank_skips, p.device, (~ok & keep[p.device]).sum())

        for group in self.param_groups:
            plain = [p for p in group["params"] if p.grad is not None and manifold_of(p) is None]
            for device in {p.device for p in plain}:
                params = [p for p in plain if p.device == device]
                for p in params:
                    state = self.state[p]
                    if "step" not in state:
                        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(
                            p, memory_format=torch.preserve_format
                        )
                beta1, beta2 = group["betas"]
                torch_adam(
                    params,
                    [p.grad for p in params],
                    [self.state[p]["exp_avg"] for p in params],
                    [self.state[p]["exp_avg_sq"] for p in params],
                    [],
                    [self.state[p]["step"] for p in params],
                    fused=True,
                    found_inf=nonfinite[device],
                    decoupled_weight_decay=True,
                    amsgrad=False,
                    beta1=beta1,
                    beta2=beta2,
                    lr=group["lr"],
                    weight_decay=group["weight_decay"],
                    eps=group["eps"],
                    maximize=group["maximize"],
                )

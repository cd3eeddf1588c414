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
one batched call per head tensor, over all its heads.
The full-size temporaries (the unmagnified gradient, then :math:`W` and the transported first
moment; the new first moment; the new point) live in three work buffers per head tensor that are
allocated once (:func:`~quotientopt.optim._base.work_buffers`), and the stored first moment is
updated in place, as torch's Adam keeps its moment tensors.

The step is :class:`~quotientopt.optim._base.QuotientOptimizer`'s one loop; the head update is
the pure kernel :func:`quotient_adam_update`, the frames live in :mod:`quotientopt.optim.adam_frames`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch.optim.adam import adam as torch_adam

from quotientopt.linalg import compute_dtype
from quotientopt.manifolds.protocol import Grams, HeadGeometry, RowSharded
from quotientopt.optim._base import (
    HeadUpdate,
    Momentum,
    PlainBatch,
    QuotientOptimizer,
    WriteLog,
    check_choice,
    check_number,
    geometry_of,
    work_buffers,
)
from quotientopt.optim.adam_frames import (  # defined there, importable here
    Basis,
    Frames,
    adam_root,
    advance_bases,
    right_solve_upper,
    stacked_cross,
    trace_preserving_transport,
)
from quotientopt.optim.manifold_kernels import manifold_adam_update
from quotientopt.optim.sgd import WEIGHT_DECAY_MODES

__all__ = [
    "AdamMoments",
    "Basis",
    "Frames",
    "QuotientAdam",
    "QuotientAdamUpdate",
    "adam_root",
    "advance_bases",
    "quotient_adam_update",
    "right_solve_upper",
    "trace_preserving_transport",
]


class AdamMoments(NamedTuple):
    """QuotientAdam's moments of one head tensor, in float32 or better."""

    exp_avg: torch.Tensor  # M, the first moment in the frames, (..., n + m, k)
    exp_avg_sq: torch.Tensor  # [V_A, V_B], the k x k second moments, (..., 2, k, k)
    step: torch.Tensor  # t, per head, (...,)


class QuotientAdamUpdate(NamedTuple):
    """What :func:`quotient_adam_update` proposes for one head tensor; nothing is written."""

    point: torch.Tensor  # Z_{t+1}, (..., n + m, k), the parameter's dtype
    moments: AdamMoments  # transported to the frames of Z_{t+1}
    basis: Basis  # the triangular factors of Z_{t+1}
    ok: torch.Tensor  # (...,) bool: the head's update may be written


def quotient_adam_update(
    point: torch.Tensor,
    grad: torch.Tensor,
    moments: AdamMoments | None,
    basis: Basis,
    geometry: HeadGeometry,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    weight_decay_mode: str,
    maximize: bool,
    keep: torch.Tensor,
    work: tuple[torch.Tensor, ...] | None = None,
) -> QuotientAdamUpdate:
    r"""One QuotientAdam step of a head tensor (the module docs' formulas; nothing written):

    .. math::

        \bar G &= [\nabla_A f\, R_B^{-1};\ \nabla_B f\, R_A^{-1}], \quad
        M_t = \beta_1 M_{t-1} + (1 - \beta_1) \bar G, \quad
        V_t = \beta_2 V_{t-1} + (1 - \beta_2) \bar G^\top \bar G, \\
        Z_{t+1} &= c Z_t - \eta\, [M_A S_A R_B^{-\top};\ M_B S_B R_A^{-\top}], \quad
        S = \frac{(\hat V^{1/2} + \epsilon I)^{-1}}{1 - \beta_1^t}, \quad
        \hat V = \frac{V_t}{1 - \beta_2^t}, \\
        M &\leftarrow M T^\top, \quad
        V \leftarrow T V T^\top + \tfrac{\operatorname{tr} V - \operatorname{tr} T V T^\top}{k} I

    (:math:`c Z_t`: :func:`_decayed`; :math:`T`: :func:`advance_bases`). ``point``, ``grad``:
    ``(..., n + m, k)``; ``moments``, ``basis``, ``work`` in float32 or better; ``keep``: bool."""
    dtype = compute_dtype(point.dtype)
    work = work if work is not None else (None, None, None)
    m, v, step = _new_moments(point, grad, moments, basis, geometry, betas, maximize, work)
    finite = basis.ok & torch.isfinite(v).flatten(-3).all(-1)  # eigh fails on NaN: skip those
    eye = torch.eye(point.shape[-1], dtype=dtype, device=point.device)
    v_hat = torch.where(finite[..., None, None, None], v / _bias(betas[1], step), eye)
    root = adam_root(v_hat, eps) / _bias(betas[0], step)
    base, scale = _decayed(point, geometry, lr * weight_decay, weight_decay_mode)
    maps = -lr * (root @ basis.r_inv.flip(-3).mT)  # the k x k maps -lr root_A R_B^{-T}
    new = _right(geometry, m, maps, add_to=base, beta=scale, out=work[2])
    w = _right(geometry, new, basis.r_inv, out=work[0])
    h, cross = stacked_cross(geometry, w, w), stacked_cross(geometry, w, point.to(dtype))
    r_new, r_inv_new, t, advanced = advance_bases(basis.r, basis.r_inv, h, cross)
    # the A side's moments live in B's frame and vice versa
    v_new = trace_preserving_transport(v, t.flip(-3))
    m_new = _right(geometry, m, t.flip(-3).mT, out=work[0])
    ok = basis.ok & advanced.all(-1) & keep
    moments = AdamMoments(m_new, v_new, step)
    return QuotientAdamUpdate(new.to(point.dtype), moments, Basis(r_new, r_inv_new, ok), ok)


def _right(geometry: HeadGeometry, x: torch.Tensor, mats: torch.Tensor, **kwargs) -> torch.Tensor:
    r"""``geometry.right_multiply`` by the stacked pair ``mats`` (``(..., 2, k, k)``):
    :math:`[X_A C_0;\ X_B C_1]`."""
    return geometry.right_multiply(x, mats[..., 0, :, :], mats[..., 1, :, :], **kwargs)


def _decayed(
    point: torch.Tensor, geometry: HeadGeometry, decay: float, mode: str
) -> tuple[torch.Tensor, float]:
    r"""``(X, c)`` with :math:`c X` the point after the decoupled decay :math:`\eta\lambda`
    (``decay``): :math:`(Z, 1 - \eta\lambda)` for the product decay (the preconditioned
    Riemannian gradient of :math:`\tfrac12\|AB^\top\|^2` is :math:`Z`), :math:`(Z - \eta\lambda
    \operatorname{grad}\|AB^\top\|_*, 1)` for the nuclear one; float32 or better."""
    base = point.to(compute_dtype(point.dtype))
    if not decay:
        return base, 1.0
    if mode == "product":
        return base, 1 - decay
    unchecked = geometry.grams(point, check=False)  # bad heads are caught by the step's flags
    return base - decay * geometry.decay_rgrad(point, "nuclear", unchecked).to(base.dtype), 1.0


def _bias(beta: float, step: torch.Tensor) -> torch.Tensor:
    r""":math:`1 - \beta^t` per head, shaped to divide ``(..., 2, k, k)`` data."""
    return (1 - beta**step)[..., None, None, None]


def _new_moments(point, grad, moments, basis, geometry, betas, maximize, work):
    r"""The unmagnified gradient :math:`\bar G` and the moments
    :math:`M_t, V_t, t` of :func:`quotient_adam_update` (``M_t`` in ``work[1]``)."""
    dtype = compute_dtype(point.dtype)
    if moments is None:
        batch, k = point.shape[:-2], point.shape[-1]
        zeros = torch.zeros(point.shape, dtype=dtype, device=point.device)
        kxk = torch.zeros((*batch, 2, k, k), dtype=dtype, device=point.device)
        moments = AdamMoments(zeros, kxk, torch.zeros(batch, dtype=dtype, device=point.device))
    grad = grad.to(dtype)
    if maximize:
        grad = -grad
    # grad_A R_B^{-1} = E U_B and grad_B R_A^{-1} = E^T U_A
    r_inv = basis.r_inv
    g = _right(geometry, grad, r_inv.flip(-3), out=work[0])
    m = torch.lerp(moments.exp_avg, g, 1 - betas[0], out=work[1])
    v = torch.lerp(moments.exp_avg_sq, stacked_cross(geometry, g, g), 1 - betas[1])
    return m, v, moments.step + 1


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
    :class:`~quotientopt.manifolds.FactorQuotient`) take the invariant step
    (:func:`quotient_adam_update`), batched over every head of the tensor with its ``k x k`` algebra in float32 or better (moments are stored in that
    dtype); parameters on other geoopt manifolds take geoopt's ``RiemannianAdam`` step; plain
    tensors take torch's fused AdamW step. The frames come from the factors' own Grams, so the
    manifold's ``metric`` does not enter the step (its ``damping`` does, through the Grams).

    The eigendecomposition of the ``k x k`` second moments (``torch.linalg.eigh``) checks
    convergence on CUDA, which is one host synchronisation per step and head tensor (one call
    over all its heads).
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
        vector = geometry.right_multiply(exp_avg, r_inv[..., 1, :, :].mT, r_inv[..., 0, :, :].mT)
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
        if isinstance(manifold, RowSharded):  # no Householder QR of a factor split over processes
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

    # ------------------------------------------------------------------------------ the kernels
    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict, keep: torch.Tensor
    ) -> HeadUpdate:
        """:func:`quotient_adam_update` with this tensor's moments and frames."""
        state = self.state[p]
        basis = self._basis(p, geometry)
        moments = None
        if "exp_avg" in state:
            moments = AdamMoments(state["exp_avg"], state["exp_avg_sq"], state["step"])
        names = ("lr", "betas", "eps", "weight_decay", "weight_decay_mode", "maximize")
        work = work_buffers(self._log, p, 3, compute_dtype(p.dtype))
        update = quotient_adam_update(
            p.detach(), p.grad, moments, basis, geometry,
            keep=keep, work=work, **{name: group[name] for name in names},
        )  # fmt: skip
        new_state = update.moments._asdict() | {
            "frame": update.basis.r,
            "frame_inv": update.basis.r_inv,
        }
        return HeadUpdate(
            update.point, new_state, update.ok, kept={"frame": basis.r, "frame_inv": basis.r_inv}
        )

    def _manifold_update(self, p: torch.Tensor, group: dict, keep: torch.Tensor) -> HeadUpdate:
        """geoopt RiemannianAdam's step for a parameter on another geoopt manifold."""
        state = self.state[p]
        moments = tuple(state.get(name) for name in ("exp_avg", "exp_avg_sq", "step"))
        names = ("lr", "betas", "eps", "weight_decay", "maximize")
        new, moments = manifold_adam_update(
            p.detach(), p.grad, moments, p.manifold, **{name: group[name] for name in names}
        )
        return HeadUpdate(
            new, dict(zip(("exp_avg", "exp_avg_sq", "step"), moments, strict=True)), keep
        )

    def _plain_step(self, group: dict, batch: PlainBatch) -> None:
        """torch's fused AdamW (its functional ``adam``) on plain tensors."""
        params, found_inf = batch.params, batch.found_inf
        states = [self.state[p] for p in params]
        for p, state in zip(params, states, strict=True):
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        torch_adam(
            params,
            [p.grad for p in params],
            [state["exp_avg"] for state in states],
            [state["exp_avg_sq"] for state in states],
            [],
            [state["step"] for state in states],
            fused=True,
            found_inf=found_inf,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
        )

    def _stepped(self, p: torch.Tensor, group: dict, update: HeadUpdate) -> None:
        self._log.record(p)

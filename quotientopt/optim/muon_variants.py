r"""Exactly invariant variants of QuotientMuon's all-heads step (issue 24 research).

Notation of :mod:`quotientopt.optim.muon`: a head tensor :math:`Z_h = [A_h; B_h]`
(``(..., H, n + m, k)``), :math:`P_h = B_h^\top B_h = L_{P,h} L_{P,h}^\top`, the whitened momentum
:math:`X = [G_{A,h} L_{P,h}^{-\top}]_h` (``n x Hk``), its polar factor
:math:`Y = \operatorname{polar}(X) = [Y_h]_h` and the direction :math:`D_{A,h} = Y_h
L_{P,h}^{-1}` (:math:`\Delta A_h = -\eta c_A D_{A,h}`); symmetrically for :math:`B` with
:math:`Q_h = A_h^\top A_h`. A re-factorization :math:`(A_h, B_h) \mapsto (A_h G_h, B_h
G_h^{-\top})` maps :math:`L_{P,h} \mapsto G_h^{-1} L_{P,h} O_h` (:math:`O_h` orthogonal), so
:math:`Y_h \mapsto Y_h O_h` and :math:`D_{A,h} \mapsto D_{A,h} G_h`.

**Which coordinates admit an elementwise moment.** An elementwise function of :math:`Y` is
invariant only under signed permutations of its columns; :math:`O_h` is an arbitrary orthogonal
matrix (it depends on :math:`G_h` and on the Cholesky factor), so an Adam-style elementwise
second moment of :math:`Y` (AdaMuon on the whitened update) is *not* invariant
(``tests/test_muon_variants.py`` measures it). Two sets of coordinates are untouched by
:math:`O_h`: the rows of :math:`Y` (the ``n`` side, which :math:`G` does not act on: row norms
:math:`\|y_i\|` are invariant), and the product change :math:`N_{A,h} = D_{A,h} B_h^\top = Y_h
U_{B,h}^\top` (``n x m``, invariant entry by entry). The variants:

* ``variant="row-norm"`` (the invariant NorMuon): a per-row second moment of :math:`Y`,
  :math:`\rho_i \leftarrow \beta_2 \rho_i + (1 - \beta_2)\, \tfrac{1}{Hk}\|y_i\|^2` (kept per head,
  :math:`u_{h,i} \leftarrow \beta_2 u_{h,i} + (1 - \beta_2) \|y_{h,i}\|^2 / k`,
  :math:`\rho_i = \operatorname{mean}_h u_{h,i}`), then :math:`Y' = c\,\operatorname{diag}
  (\rho_i + \epsilon)^{-1/2}\, Y` with :math:`c` restoring :math:`\|Y'\|_F = \|Y\|_F`; the
  direction is :math:`D' = Y' L^{-1}` (a row scaling of :math:`D`). Rows of ``A`` are the
  ``n`` side (input features of a query/key/value sector), not torch NorMuon's output rows of
  :math:`W_Q`, which :math:`G` mixes.
* ``variant="product-adam"`` (the invariant AdaMuon): an elementwise second moment of the
  product change, :math:`V_A \leftarrow \beta_2 V_A + (1 - \beta_2) N_A \odot N_A`
  (``(H, n, m)`` per side), :math:`\tilde N_A = N_A \oslash (\sqrt{V_A} + \epsilon)`, lifted to
  :math:`A` by least squares, :math:`D'_A = c\, \tilde N_A B P^{-1}` (the :math:`\Delta A` whose
  :math:`\Delta A\, B^\top` is the projection of :math:`\tilde N_A` onto the column space of
  :math:`B`), :math:`c` restoring :math:`\|D'_A L_P\|_F = \|Y_A\|_F`; :math:`B` with
  :math:`N_B = A D_B^\top`, :math:`D'_B = c\, \tilde N_B^\top A Q^{-1}`. Under :math:`G`:
  :math:`\tilde N B P^{-1} \mapsto \tilde N B G^{-\top} G^\top P^{-1} G = \tilde N B P^{-1} G`.
  No bias correction: :math:`c` removes every scalar factor.
* ``variant="invariant-damping"``: the whitening by :math:`P_\delta = P + \delta\tau Q^{-1}`,
  :math:`Q_\delta = Q + \delta\tau P^{-1}`, :math:`\tau = \operatorname{tr}(PQ)/k =
  \|W\|_F^2 / k`, instead of :math:`P`, :math:`Q`. :math:`Q^{-1}` transforms as :math:`P` does
  (:math:`G^{-1} \cdot G^{-\top}`), so :math:`P_\delta` is a metric of the same kind and the
  step stays exactly equivariant, unlike :math:`P + \lambda I`. In a balanced frame
  (:math:`P = Q = \Sigma`) the eigenvalues of :math:`P_\delta Q` are :math:`\sigma_i^2 +
  \delta\tau`: the singular values of :math:`W` that the whitening divides by are floored at
  :math:`\sqrt{\delta}` times their RMS. Since :math:`P \preceq P_\delta`, the product change
  keeps :math:`\|\Delta W\|_2 \le 1` per unit scale; :math:`\delta = 0` is QuotientMuon.

Every variant keeps QuotientMuon's momentum (on the factor gradients), decay, scale rule
(:math:`c_A = 0.2\sqrt{Hnm/\min(n, Hk)}`) and rank policy. Only ``head_norm="all-heads"`` on head
tensors with a head axis, not sharded (a clear error otherwise); plain matrices take torch Muon's
step as in :class:`~quotientopt.optim.QuotientMuon`. Measured under the protocol:
``docs/how-to/muon_variants.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from quotientopt.manifolds.protocol import HeadGeometry, RowSharded
from quotientopt.optim._base import HeadUpdate, check_choice, check_number
from quotientopt.optim._sharded_muon import head_shards
from quotientopt.optim.hybrid import HybridOptimizer
from quotientopt.optim.muon import (
    HEAD_LR_RATIO,
    QuotientMuon,
    _decay,
    _gram_polar,
    _sort_parameters,
    _stays_healthy,
    polar_route,
)
from quotientopt.optim.muon_kernels import _across_heads_block_step

__all__ = ["VARIANTS", "QuotientMuonVariant", "variant_muon_and_adamw"]

VARIANTS = ("row-norm", "product-adam", "invariant-damping")


def _whiten_back(d: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    r""":math:`Y_h = D_h L_h` (``(..., H, rows, k)`` times ``(..., H, k, k)``)."""
    return d @ chol


def _frobenius_over_heads(y: torch.Tensor) -> torch.Tensor:
    r""":math:`\|[Y_1, \dots, Y_H]\|_F` per head tensor, shaped to broadcast over
    ``(..., H, rows, k)``."""
    return y.square().sum((-3, -2, -1), keepdim=True).sqrt()


def row_norm_directions(
    d: torch.Tensor, chol: torch.Tensor, moment: torch.Tensor, beta2: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``variant="row-norm"`` on one side: from :math:`D` (``(..., H, rows, k)``), the Cholesky
    factors :math:`L` (``(..., H, k, k)``) and the per-head row moment :math:`u`
    (``(..., H, rows)``), the new moment :math:`u' = \beta_2 u + (1 - \beta_2)\|y_{h,i}\|^2/k` and
    :math:`D' = c\, \operatorname{diag}(\rho + \epsilon)^{-1/2} D`, :math:`\rho_i =
    \operatorname{mean}_h u'_{h,i}`, :math:`c = \|Y\|_F / \|\operatorname{diag}(\rho +
    \epsilon)^{-1/2} Y\|_F`."""
    y = _whiten_back(d, chol)
    moment = moment.lerp(y.square().mean(-1), 1 - beta2)
    inv_root = (moment.mean(-2, keepdim=True) + eps).rsqrt()[..., None]  # (..., 1, rows, 1)
    scaled = y * inv_root
    c = _frobenius_over_heads(y) / _frobenius_over_heads(scaled).clamp_min(1e-30)
    return d * inv_root * c, moment


def product_adam_directions(
    d: torch.Tensor,
    partner: torch.Tensor,
    chol: torch.Tensor,
    moment: torch.Tensor,
    beta2: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``variant="product-adam"`` on the ``A`` side (call with ``d = D_B``, ``partner = A``,
    ``chol = L_Q`` for ``B``, the moment then of :math:`N^\top`): :math:`N = D\, B^\top`
    (``(..., H, n, m)``), :math:`V' = \beta_2 V + (1 - \beta_2) N \odot N`, :math:`\tilde N = N
    \oslash (\sqrt{V'} + \epsilon)`, :math:`D' = c\, \tilde N B P^{-1}` with :math:`P^{-1}` from
    :math:`L` (``cholesky_solve``) and :math:`c = \|Y\|_F / \|D' L\|_F` over the heads."""
    n_change = d @ partner.mT
    moment = moment.lerp(n_change.square(), 1 - beta2)
    preconditioned = n_change / (moment.sqrt() + eps)
    lifted = torch.cholesky_solve((preconditioned @ partner).mT, chol).mT  # N~ B P^{-1}
    c = _frobenius_over_heads(_whiten_back(d, chol)) / _frobenius_over_heads(
        _whiten_back(lifted, chol)
    ).clamp_min(1e-30)
    return lifted * c, moment


def invariantly_damped(grams, delta: float):
    r"""``variant="invariant-damping"``: the Grams with :math:`P_\delta = P + \delta\tau Q^{-1}`,
    :math:`Q_\delta = Q + \delta\tau P^{-1}`, :math:`\tau = \operatorname{tr}(PQ)/k`, and their
    lower Cholesky factors (``p_inv``/``q_inv`` dropped); the inverses come from the given
    factors (``cholesky_inverse``), batched over heads."""
    k = grams.p.shape[-1]
    tau = ((grams.p * grams.q).sum((-2, -1)) / k)[..., None, None]
    p_inv = torch.cholesky_inverse(grams.chol_p)
    q_inv = torch.cholesky_inverse(grams.chol_q)
    p_d = grams.p + delta * tau * q_inv
    q_d = grams.q + delta * tau * p_inv
    p_d, q_d = 0.5 * (p_d + p_d.mT), 0.5 * (q_d + q_d.mT)
    # heads the step skips (not ok) keep their stand-in factors; no host synchronisation
    chol_p, info_p = torch.linalg.cholesky_ex(p_d)
    chol_q, info_q = torch.linalg.cholesky_ex(q_d)
    good = (grams.ok & (info_p == 0) & (info_q == 0))[..., None, None]
    return grams._replace(
        p=torch.where(good, p_d, grams.p),
        q=torch.where(good, q_d, grams.q),
        chol_p=torch.where(good, chol_p, grams.chol_p),
        chol_q=torch.where(good, chol_q, grams.chol_q),
        p_inv=None,
        q_inv=None,
    )


class QuotientMuonVariant(QuotientMuon):
    r"""QuotientMuon's all-heads step with one of the invariant variants of the module docs.

    Args:
        params: as :class:`~quotientopt.optim.QuotientMuon`.
        variant: ``"row-norm"``, ``"product-adam"`` or ``"invariant-damping"``.
        beta2: the second moment's decay (``row-norm``, ``product-adam``; NorMuon's and
            AdaMuon's 0.95).
        variant_eps: :math:`\epsilon` of the moment's root (``row-norm``, ``product-adam``).
        damping: :math:`\delta` of ``invariant-damping`` (0.01: the whitening's singular values
            of :math:`W` floored at 0.1 times their RMS).
        **options: QuotientMuon's options; ``head_norm`` must stay ``"all-heads"``.

    State per head tensor besides ``momentum_buffer``: ``row_moment`` (``(..., H, n + m)``) or
    ``product_moment`` (``(..., H, 2, n, m)``)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        *,
        variant: str = "row-norm",
        beta2: float = 0.95,
        variant_eps: float = 1e-8,
        damping: float = 0.01,
        **options: Any,
    ) -> None:
        check_choice("variant", variant, VARIANTS)
        check_number("beta2", beta2, 0.0, 1.0, high_open=True)
        check_number("variant_eps", variant_eps, 0.0, float("inf"), low_open=True)
        check_number("damping", damping, 0.0, float("inf"))
        if options.get("head_norm", "all-heads") != "all-heads":
            raise ValueError(
                f"QuotientMuonVariant: variant={variant!r} modifies the all-heads step; "
                f"head_norm={options['head_norm']!r} is not supported: drop it (the default is "
                "'all-heads') or use QuotientMuon for per-head steps"
            )
        self._variant = dict(variant=variant, beta2=beta2, variant_eps=variant_eps, damping=damping)
        super().__init__(params, lr, **options)
        for group in self.param_groups:
            for key, value in self._variant.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key, value in getattr(self, "_variant", {}).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)

    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict[str, Any], keep: torch.Tensor
    ) -> HeadUpdate:
        r"""QuotientMuon's head kernel with the variant's directions: the candidate point
        :math:`\sqrt{1 - \eta\lambda}\, Z - \eta [c_A D'_A; c_B D'_B]`, the new momentum and
        moment, the per-head health flag; nothing written."""
        z, state = p.detach(), self.state[p]
        if z.dim() < 3 or head_shards(p) is not None or isinstance(geometry, RowSharded):
            raise ValueError(
                f"QuotientMuonVariant: a head tensor of shape {tuple(z.shape)} (without a head "
                "axis, or sharded) is not supported; give it a head axis (..., H, n + m, k) "
                "unsharded, or use QuotientMuon"
            )
        buf, update, base = self._momentum_and_grams(p, geometry, group)
        grams = base
        if group["variant"] == "invariant-damping" and group["damping"] > 0:
            grams = invariantly_damped(base, group["damping"])
        route = polar_route(group["polar"], z, False)
        d_a, d_b = _across_heads_block_step(geometry, update, grams, _gram_polar(group), route)
        d_a, d_b, moments = _variant_directions(state, geometry, z, grams, d_a, d_b, group)
        (n, m_rows), (heads, k) = geometry.sector_rows, (z.shape[-3], z.shape[-1])
        scale_a = 0.2 * math.sqrt(heads * n * m_rows / min(n, heads * k))
        scale_b = 0.2 * math.sqrt(heads * n * m_rows / min(m_rows, heads * k))
        step = (torch.cat((d_a * scale_a, d_b * scale_b), dim=-2) * -group["lr"]).to(z.dtype)
        decay = _decay(group)
        new = (z * math.sqrt(decay) + step) if decay != 1.0 else z + step
        ok = _stays_healthy(geometry, base, new, keep)
        return HeadUpdate(new, {"momentum_buffer": buf, **moments}, ok)


def variant_muon_and_adamw(
    model: torch.nn.Module,
    lr: float = 0.02,
    *,
    variant: str = "row-norm",
    head_lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float = 0.1,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_weight_decay: float = 0.1,
    hidden: Callable[[str, torch.Tensor], bool] | None = None,
    **options: Any,
) -> HybridOptimizer:
    r""":func:`~quotientopt.optim.muon_and_adamw` with :class:`QuotientMuonVariant` (``variant``,
    ``options``: its options) on heads (at ``head_lr``, default 0.2 ``lr``) and hidden matrices
    (torch Muon's step at ``lr``), ``torch.optim.AdamW`` on the rest."""
    heads, matrices, rest = _sort_parameters(model, hidden)
    head_group = {"params": heads, "lr": HEAD_LR_RATIO * lr if head_lr is None else head_lr}
    groups = [g for g in (head_group, {"params": matrices, "lr": lr}) if g["params"]]
    options.setdefault("adjust_lr_fn", "match_rms_adamw")
    muon = QuotientMuonVariant(groups, lr, variant=variant, weight_decay=weight_decay, **options)
    adamw = torch.optim.AdamW(
        rest,
        lr=lr if adamw_lr is None else adamw_lr,
        betas=adamw_betas,
        weight_decay=adamw_weight_decay,
    )
    return HybridOptimizer(muon, adamw)


def _variant_directions(
    state: dict[str, Any],
    geometry: HeadGeometry,
    z: torch.Tensor,
    grams: Any,
    d_a: torch.Tensor,
    d_b: torch.Tensor,
    group: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The variant's directions from QuotientMuon's whitened polar directions ``d_a``, ``d_b``
    (row-norm: :func:`row_norm_directions`; product-adam: :func:`product_adam_directions`;
    invariant-damping: unchanged) and the new moments to keep in the state."""
    variant, moments = group["variant"], {}
    beta2, eps = group["beta2"], group["variant_eps"]
    n = geometry.sector_rows[0]
    if variant == "row-norm":
        moment = state.get("row_moment")
        if moment is None:
            moment = z.new_zeros(z.shape[:-1], dtype=grams.p.dtype)
        d_a, m_a = row_norm_directions(d_a, grams.chol_p, moment[..., :n], beta2, eps)
        d_b, m_b = row_norm_directions(d_b, grams.chol_q, moment[..., n:], beta2, eps)
        moments["row_moment"] = torch.cat((m_a, m_b), dim=-1)
    elif variant == "product-adam":
        a, b = (f.to(grams.p.dtype) for f in geometry.factors(z))
        moment = state.get("product_moment")
        if moment is None:
            shape = (*z.shape[:-2], 2, a.shape[-2], b.shape[-2])
            moment = z.new_zeros(shape, dtype=grams.p.dtype)
        d_a, m_a = product_adam_directions(d_a, b, grams.chol_p, moment[..., 0, :, :], beta2, eps)
        d_b, m_b = product_adam_directions(
            d_b, a, grams.chol_q, moment[..., 1, :, :].mT, beta2, eps
        )
        moments["product_moment"] = torch.stack((m_a, m_b.mT), dim=-3)
    return d_a, d_b, moments

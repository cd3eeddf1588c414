r"""QuotientMuon: spectral steepest descent of the head products, exactly invariant under
re-factorization; torch's own Muon for plain matrices.

The step, its ``k x k`` form, the all-heads norm, the precision routes, the invariance, the scales,
weight decay, rank loss and FSDP2 are derived in ``docs/quotient_muon.md`` ("The module in
detail"); the options and their checks live in :mod:`quotientopt.optim.muon_options`, the pure
polar and whitening kernels in :mod:`quotientopt.optim.muon_kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch.optim import _muon as torch_muon_module

from quotientopt.manifolds.protocol import HeadGeometry, RowSharded
from quotientopt.optim._base import (
    HeadUpdate,
    Momentum,
    PlainBatch,
    QuotientOptimizer,
    check_choice,
    check_number,
    geometry_of,
)
from quotientopt.optim._sharded_muon import head_shards, is_sharded, sharded_matrix_step
from quotientopt.optim.hybrid import HybridOptimizer
from quotientopt.optim.muon_kernels import (
    NS_COEFFICIENTS,
    _across_heads_block_step,
    _block_matrices,
    _tangent_matrices,
    polar_right_factor,
)
from quotientopt.optim.muon_options import (  # noqa: F401
    ADJUST_LR_FNS,
    HEAD_LR_RATIO,
    HEAD_NORMS,
    HEAD_SCALES,
    POLAR_METHODS,
    STEP_KINDS,
    _check_options,
    _check_parameter,
    _decay,
    _gram_polar,
    _momentum_update,
    _stays_healthy,
)
from quotientopt.optim.muon_split import _sort_parameters

__all__ = ["NS_COEFFICIENTS", "QuotientMuon", "muon_and_adamw", "polar_right_factor"]

_FAST_BFLOAT16: dict[str, bool] = {}


def bfloat16_matmul_is_fast(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA device with native
    bfloat16 (``torch.cuda.is_bf16_supported(including_emulation=False)``), a CPU with
    AVX512-BF16 or AMX tiles (``torch.cpu._is_avx512_bf16_supported``,
    ``_is_amx_tile_supported``). Elsewhere torch emulates it: on this project's AMD EPYC
    development machine a 768 x 768 bfloat16 product took 1.46 s against 29 ms in float32
    (``docs/quotient_muon.md``). Cached per device type."""
    kind = torch.device(device).type
    if kind not in _FAST_BFLOAT16:
        if kind == "cuda":
            fast = torch.cuda.is_available() and torch.cuda.is_bf16_supported(
                including_emulation=False
            )
        elif kind == "cpu":
            fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        else:
            fast = False
        _FAST_BFLOAT16[kind] = bool(fast)
    return _FAST_BFLOAT16[kind]


def polar_route(polar: str, z: torch.Tensor, row_sharded: bool) -> str:
    r"""How the all-heads step computes :math:`\operatorname{polar}(X)` of one head tensor
    ``z``: ``"bf16-x"`` (torch Muon's bfloat16 quintic iteration on :math:`X` itself, through
    ``torch.optim._muon._zeropower_via_newtonschulz``), ``"newton-schulz"`` (the same iteration
    on the Gram :math:`S = X^\top X`, in float32 or the parameter's precision where better) or
    ``"eigh"``.

    ``polar="newton-schulz"`` (the default) is torch Muon's precision policy where it is the
    cheaper one: bfloat16 on :math:`X` for float32/bfloat16 parameters on a device that
    multiplies bfloat16 fast (:func:`bfloat16_matmul_is_fast`), the float32 Gram iteration for
    float64 parameters (exactness), on other devices (there it was 15x cheaper than bfloat16,
    ``docs/quotient_muon.md``) and for row-sharded tensors (whose Gram is all-reduced as ``Hk x
    Hk`` data; :math:`X` would have to be gathered). ``"newton-schulz-bf16"`` asks for the
    bfloat16 route, ``"newton-schulz-float32"`` for the Gram route, everywhere."""
    if polar == "eigh":
        return "eigh"
    if polar == "newton-schulz-float32":
        return "newton-schulz"
    if polar == "newton-schulz-bf16":
        if row_sharded:
            raise ValueError(
                "QuotientMuon: polar='newton-schulz-bf16' needs each head tensor's whole X, but "
                "this one is sharded along its rows; use polar='newton-schulz' (the Gram is "
                "reduced over the row shards) or shard the head axis"
            )
        return "bf16-x"
    fast = z.dtype != torch.float64 and not row_sharded and bfloat16_matmul_is_fast(z.device)
    return "bf16-x" if fast else "newton-schulz"


class PerHead(NamedTuple):
    r"""``head_norm="per-head"``: each head in its own spectral norm, the ``"block"`` step
    (:math:`\Delta A = -G_A K_A`) or the ``"tangent"`` one, scaled by ``head_scale`` ``"rms"``
    or ``"balanced"`` (module docs), applied with the geometry's ``right_multiply``."""

    tangent: bool = False
    balanced: bool = False

    def __call__(self, p, geometry, update, grams, polar: dict, lr: float) -> torch.Tensor:
        r"""The step :math:`\Delta Z` of head tensor ``p`` (``update``: the momentum direction;
        ``polar``: the kernels' Gram options)."""
        z = p.detach()
        if self.tangent:
            on_update, on_point = _tangent_matrices(geometry, z, update, grams, polar)
        else:
            on_update, on_point = _block_matrices(geometry, update, grams, polar), None
        (n, m_rows), k = geometry.sector_rows, z.shape[-1]
        if not self.balanced:
            scale = torch.full(
                (*z.shape[:-2], 2),
                0.2 * math.sqrt(n * m_rows / k),
                dtype=grams.p.dtype,
                device=z.device,
            )
        else:
            w_sq = (grams.p * grams.q).sum((-1, -2))  # ||A B^T||_F^2 = tr(PQ)
            root = (w_sq.clamp_min(0) / k).pow(0.25)
            sides = torch.tensor(
                [0.2 * math.sqrt(max(n, k)), 0.2 * math.sqrt(max(m_rows, k))],
                dtype=grams.p.dtype,
                device=z.device,
            )
            scale = root[..., None] * sides
        factor = (-lr * scale)[..., None, None]
        on_update = on_update * factor
        step = geometry.right_multiply(update, on_update[..., 0, :, :], on_update[..., 1, :, :])
        if on_point is not None:
            on_point = on_point * factor
            step = step + geometry.right_multiply(z, on_point[..., 0, :, :], on_point[..., 1, :, :])
        return step


class AllHeads(NamedTuple):
    r"""``head_norm="all-heads"``: the block step in the spectral norm of all heads' product
    changes side by side, with the ``"rms"`` scale; ``polar`` is the option that
    :func:`polar_route` turns into the route per tensor. There is no tangent or balanced field:
    those are per-head steps. A tensor without a head axis takes :class:`PerHead`'s step."""

    polar: str = "newton-schulz"

    def __call__(self, p, geometry, update, grams, polar: dict, lr: float) -> torch.Tensor:
        r""":math:`-\eta\,[c_A D_A; c_B D_B]` from
        :func:`~quotientopt.optim.muon_kernels._across_heads_block_step`, in ``p``'s dtype, with
        :math:`c_A = 0.2 \sqrt{H n m / \min(n, Hk)}` (:math:`c_B`: :math:`\min(m, Hk)`)."""
        z = p.detach()
        if z.dim() == 2:  # one head alone (no head axis): the all-heads step is the per-head one
            return PerHead()(p, geometry, update, grams, polar, lr)
        # the whole sector's row counts (geometry.n, .m are this shard's under row sharding)
        (n, m_rows), (heads, k) = geometry.sector_rows, (z.shape[-3], z.shape[-1])
        route = polar_route(self.polar, z, isinstance(geometry, RowSharded))
        direction_a, direction_b = _across_heads_block_step(
            geometry, update, grams, polar, route, head_shards(p)
        )
        # [dA_1 B_1^T, ..., dA_H B_H^T] (n x Hm) has min(n, Hk) unit singular values
        scale_a = 0.2 * math.sqrt(heads * n * m_rows / min(n, heads * k))
        scale_b = 0.2 * math.sqrt(heads * n * m_rows / min(m_rows, heads * k))
        step = torch.cat((direction_a * scale_a, direction_b * scale_b), dim=-2)
        return (step * -lr).to(z.dtype)


def head_step(group: dict[str, Any]) -> PerHead | AllHeads:
    """The head step a group's options name; refused where ``head_norm="all-heads"`` meets a
    per-head option (``step="tangent"``, ``head_scale="balanced"``) or ``head_norm="per-head"``
    meets ``polar="newton-schulz-bf16"`` (the per-head polar is a ``k x k`` Gram iteration,
    always cheaper in float32)."""
    head_norm = group.get("head_norm", "per-head")  # groups saved before head_norm: per-head
    check_choice("head_norm", head_norm, HEAD_NORMS)
    check_choice("polar", group["polar"], POLAR_METHODS)
    if head_norm == "per-head":
        if group["polar"] == "newton-schulz-bf16":
            raise ValueError(
                "QuotientMuon: polar='newton-schulz-bf16' runs torch Muon's iteration on the "
                "all heads' n x Hk matrix X (head_norm='all-heads'); the per-head polar is a "
                "k x k Gram iteration in float32: pass polar='newton-schulz' with "
                "head_norm='per-head'"
            )
        return PerHead(tangent=group["step"] == "tangent", balanced=group["head_scale"] != "rms")
    if group["step"] != "block" or group["head_scale"] != "rms":
        raise ValueError(
            "QuotientMuon: head_norm='all-heads' (the default) is a block step with the "
            f"'rms' scale; step={group['step']!r} and head_scale={group['head_scale']!r} are "
            "per-head steps: pass head_norm='per-head' with them"
        )
    return AllHeads(group["polar"])


def _check_head_norm(group: dict[str, Any], placements: bool = False) -> None:
    """:func:`head_step`'s refusals and, with ``placements``, a head tensor of an all-heads
    group sharded both on its head axis and on another axis."""
    if isinstance(head_step(group), AllHeads):
        for p in group["params"] if placements else ():
            if geometry_of(p) is not None and p.dim() > 2:
                head_shards(p)  # a head axis sharded together with another axis is refused


class QuotientMuon(QuotientOptimizer):
    r"""Muon on the head quotients (see the module docs), ``torch.optim.Muon`` on plain matrices.

    Args:
        params: parameters or groups: head parameters (``geoopt.ManifoldParameter`` on a head
            geometry, :class:`~quotientopt.manifolds.FactorQuotient` or
            :class:`~quotientopt.manifolds.SubgroupFactorQuotient`, shape ``(..., n + m, k)``)
            and plain 2-D matrices. Embeddings, gains and biases belong to another optimizer
            (AdamW): :func:`muon_and_adamw` builds the usual split for a model.
        lr: learning rate :math:`\eta` (a torch Muon lr: ``0.02`` with
            ``adjust_lr_fn="match_rms_adamw"`` is AdamW-scale).
        momentum: :math:`\beta` in ``[0, 1)``, on the Euclidean gradients (torch Muon's
            ``buf.lerp_(grad, 1 - beta)``).
        nesterov: use ``grad.lerp(buf, beta)`` as the direction (torch Muon's Nesterov).
        weight_decay: decoupled decay :math:`\lambda`: matrices and head products are scaled by
            :math:`1 - \eta\lambda` per step.
        adjust_lr_fn: torch Muon's lr scaling of plain matrices (``None``/``"original"``:
            :math:`\sqrt{\max(1, A/B)}`; ``"match_rms_adamw"``: :math:`0.2\sqrt{\max(A, B)}`).
        head_scale: ``"rms"`` (default: the product change has AdamW's RMS 0.2 per unit lr) or
            ``"balanced"`` (module docs). Measured on the benchmark GPT, heads want about 0.2x
            the lr of the MLP matrices with ``"rms"`` (:func:`muon_and_adamw`'s default).
        polar: how the all-heads step computes :math:`\operatorname{polar}(X)`
            (:func:`polar_route`): ``"newton-schulz"`` (default: torch Muon's precision policy
            where it is the cheaper one, i.e. torch Muon's bfloat16 iteration on the
            ``n x Hk`` matrix :math:`X` for float32/bfloat16 parameters on a device with fast
            bfloat16 matmuls, the float32 iteration on the ``Hk x Hk`` Gram for float64
            parameters, on other devices and for row shards), ``"newton-schulz-bf16"`` or
            ``"newton-schulz-float32"`` (one route everywhere), or ``"eigh"`` (exact). None
            synchronises with the host but ``"eigh"`` on CUDA. The per-head and tangent steps
            always use the ``k x k`` Gram (in float32 or better; ``"eigh"`` there too).
        head_norm: ``"all-heads"`` (default: the polar of all heads of a tensor side by side,
            axis -3 the heads; one ``Hk x Hk`` polar per side) or ``"per-head"`` (each head's own
            ``k x k`` polar: cheaper, lost on the benchmark). A tensor sharded on its head axis
            (FSDP2's default ``Shard(0)``) needs ``"per-head"`` or row sharding.
        step: ``"block"`` (default: each factor's own polar, both from the same point) or
            ``"tangent"`` (the polar of the product gradient's projection onto the tangent space
            of the rank-k matrices, lifted horizontally; uses ``eigh``, which synchronises on
            CUDA; with ``head_norm="per-head"``). See ``docs/quotient_muon.md`` for the
            comparison.
        ns_coefficients: the quintic Newton-Schulz coefficients :math:`(a, b, c)` (torch Muon's).
        ns_steps: Newton-Schulz iterations (torch Muon's 5).
        eps: regularization of the polar factor (torch Muon's 1e-7; module docs).
        on_nonfinite: ``"skip"`` (default, no host synchronisation), ``"warn"`` or ``"raise"``:
            a NaN/Inf gradient skips the whole step (every parameter and momentum kept); a head
            update that would lose rank skips that head.

    State per parameter: ``momentum_buffer`` (the parameter's shape and dtype, as torch Muon's).
    Head updates are batched over every head of a tensor; nothing loops over heads in Python.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        *,
        adjust_lr_fn: str | None = "match_rms_adamw",
        head_scale: str = "rms",
        polar: str = "newton-schulz",
        step: str = "block",
        head_norm: str = "all-heads",
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        ns_steps: int = 5,
        eps: float = torch_muon_module.EPS,
        on_nonfinite: str = "skip",
    ) -> None:
        options = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            adjust_lr_fn=adjust_lr_fn,
            head_scale=head_scale,
            polar=polar,
            step=step,
            head_norm=head_norm,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            eps=eps,
        )
        _check_options(options)
        defaults = options | {"ns_coefficients": tuple(ns_coefficients)}
        super().__init__(params, defaults, on_nonfinite=on_nonfinite)

    @staticmethod
    def _check_parameter(p: torch.Tensor) -> None:
        _check_parameter(p)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _check_head_norm(self.param_groups[-1], placements=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``; then the loaded groups' ``head_norm`` is checked against
        their options and parameters (as for a new group)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _check_head_norm(group, placements=True)

    def momentum(self, p: torch.Tensor) -> Momentum | None:
        """The momentum buffer at ``p``: the running average of Euclidean gradients, a covector
        (for heads as for plain matrices); None before the first step."""
        buf = self.state[p].get("momentum_buffer") if p in self.state else None
        return None if buf is None else Momentum(buf, "covector")

    # ------------------------------------------------------------------------ the head step
    def _momentum_and_grams(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The head kernel's start: the new ``momentum_buffer``, the (Nesterov) update it gives
        and the regularized Grams at the current point (warning once on a rank-deficient start)."""
        z, state = p.detach(), self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = torch.zeros_like(z, memory_format=torch.preserve_format)
        buf, update = _momentum_update(buf, p.grad, group)
        grams = geometry.grams(z, check=False, regularize=True)
        if "momentum_buffer" not in state:
            self._warn_if_rank_deficient(grams.regularized)
        return buf, update, grams

    def _head_update(
        self, p: torch.Tensor, geometry: HeadGeometry, group: dict[str, Any], keep: torch.Tensor
    ) -> HeadUpdate:
        r"""The head kernel: the candidate point :math:`\sqrt{1 - \eta\lambda}\, Z + \Delta Z`
        (the all-heads or per-head step of the module docs, on the Nesterov momentum of the
        gradient), the new ``momentum_buffer`` and the per-head health flag; nothing written."""
        z = p.detach()
        buf, update, grams = self._momentum_and_grams(p, geometry, group)
        polar = _gram_polar(group)
        decay = _decay(group)
        step = head_step(group)(p, geometry, update, grams, polar, group["lr"])
        new = (z * math.sqrt(decay) + step) if decay != 1.0 else z + step
        ok = _stays_healthy(geometry, grams, new, keep)
        return HeadUpdate(new, {"momentum_buffer": buf}, ok)

    # ---------------------------------------------------------------------------- the step
    def _step(self, nonfinite: dict[torch.device, torch.Tensor], loss: torch.Tensor | None) -> None:
        """The base class's one step loop (:meth:`QuotientOptimizer._step`), after every group's
        options are checked: they may have been written into ``param_groups`` since, and a
        refused combination must move nothing."""
        for group in self.param_groups:
            _check_head_norm(group)
        super()._step(nonfinite, loss)

    def _plain_step(self, group: dict[str, Any], batch: PlainBatch) -> None:
        """torch.optim.Muon's step (its functional ``muon``) on plain matrices (``batch``: one
        group's on one device); where a gradient is non-finite (``batch.found_inf``), parameters
        and buffers are restored afterwards, device-side."""
        params = batch.params
        sharded = [p for p in params if is_sharded(p)]
        params = [p for p in params if not is_sharded(p)]
        bufs = []
        for p in params + sharded:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(
                    p.grad, memory_format=torch.preserve_format
                )
            bufs.append(state["momentum_buffer"])
        saved = [
            (p.detach().clone(), b.clone()) for p, b in zip(params + sharded, bufs, strict=True)
        ]
        for p, buf in zip(sharded, bufs[len(params) :], strict=True):  # gathered whole
            sharded_matrix_step(p, buf, group)
        if params:
            torch_muon_module.muon(
                params,
                [p.grad for p in params],
                bufs[: len(params)],
                lr=group["lr"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                nesterov=group["nesterov"],
                ns_coefficients=group["ns_coefficients"],
                ns_steps=group["ns_steps"],
                eps=group["eps"],
                adjust_lr_fn=group["adjust_lr_fn"],
                has_complex=False,
            )
        for p, b, (p_old, b_old) in zip(params + sharded, bufs, saved, strict=True):
            bad = batch.found_inf > 0
            torch.where(bad, p_old, p.detach(), out=p.detach())
            torch.where(bad, b_old, b, out=b)


def muon_and_adamw(
    model: torch.nn.Module,
    lr: float = 0.02,
    *,
    head_lr: float | None = None,
    adamw_lr: float | None = None,
    weight_decay: float = 0.1,
    head_weight_decay: float | None = None,
    adamw_betas: tuple[float, float] = (0.9, 0.95),
    adamw_weight_decay: float = 0.1,
    hidden: Callable[[str, torch.Tensor], bool] | None = None,
    **muon_options: Any,
) -> HybridOptimizer:
    r"""The drop-in for a "Muon + AdamW" setup, in one line:
    ``optimizer = muon_and_adamw(model, lr=0.02)``.

    * head parameters (on a head geometry) -> :class:`QuotientMuon` at ``head_lr`` (default
      ``0.2 * lr``, the measured best ratio for the default ``head_scale="rms"``);
    * the hidden 2-D matrices -> :class:`QuotientMuon` at ``lr``, i.e. torch Muon's own step
      (``adjust_lr_fn="match_rms_adamw"`` unless given);
    * everything else (embeddings, the output layer, gains, biases) -> ``torch.optim.AdamW`` at
      ``adamw_lr`` (default ``lr``: the AdamW-matched scaling makes one lr serve all three).

    ``weight_decay`` is QuotientMuon's decoupled decay (the hidden matrices', and the heads'
    unless ``head_weight_decay`` is given: each step scales a head's product by
    ``1 - head_lr * head_weight_decay``, a matrix by ``1 - lr * weight_decay``).

    ``hidden(name, p)`` decides which plain 2-D parameters are hidden matrices; the default takes
    those of ``torch.nn.Linear`` layers, not of ``torch.nn.Embedding`` (nor tied to one), and not
    of a layer named ``lm_head``, ``head``, ``classifier`` or ``output``. ``muon_options`` go to
    :class:`QuotientMuon`. Returns a :class:`~quotientopt.optim.HybridOptimizer` (``heads``: the
    QuotientMuon, ``rest``: the AdamW).
    """
    heads, matrices, rest = _sort_parameters(model, hidden)
    head_group = {"params": heads, "lr": HEAD_LR_RATIO * lr if head_lr is None else head_lr}
    if head_weight_decay is not None:
        check_number("head_weight_decay", head_weight_decay, 0.0, float("inf"))
        head_group["weight_decay"] = head_weight_decay
    groups = [g for g in (head_group, {"params": matrices, "lr": lr}) if g["params"]]
    muon_options.setdefault("adjust_lr_fn", "match_rms_adamw")
    muon = QuotientMuon(groups, lr=lr, weight_decay=weight_decay, **muon_options)
    adamw = torch.optim.AdamW(
        rest,
        lr=lr if adamw_lr is None else adamw_lr,
        betas=adamw_betas,
        weight_decay=adamw_weight_decay,
    )
    return HybridOptimizer(muon, adamw)

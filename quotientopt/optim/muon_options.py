r"""QuotientMuon's options: their choices, the checks that refuse a bad one, and the small
per-group helpers of its head update (momentum, the Gram polar options, the decay, the health
flag); :mod:`quotientopt.optim.muon` uses them."""

from __future__ import annotations

from typing import Any

import torch

from quotientopt.distributed import is_dtensor
from quotientopt.manifolds.protocol import RowSharded
from quotientopt.optim._base import check_choice, check_number, geometry_of, manifold_of

STEP_KINDS = ("block", "tangent")
HEAD_NORMS = ("per-head", "all-heads")
#: ``polar=``: the precision policy (default), torch Muon's bfloat16 iteration on X, the k x k
#: iteration on the Gram in float32 or better, the exact inverse root
POLAR_METHODS = ("newton-schulz", "newton-schulz-bf16", "newton-schulz-float32", "eigh")
HEAD_SCALES = ("balanced", "rms")
HEAD_LR_RATIO = (
    0.2  # muon_and_adamw's default head lr / matrix lr (measured, docs/quotient_muon.md)
)
ADJUST_LR_FNS = (None, "original", "match_rms_adamw")


def _momentum_update(
    buf: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""torch Muon's momentum on the Euclidean gradient: the new buffer
    :math:`b \leftarrow b + (1 - \beta)(g - b)` and the direction, :math:`g + \beta (b - g)`
    with Nesterov, else :math:`b` (nothing written)."""
    beta = group["momentum"]
    buf = buf.lerp(grad, 1 - beta)
    return buf, grad.lerp(buf, beta) if group["nesterov"] else buf


def _gram_polar(group: dict[str, Any]) -> dict[str, Any]:
    """The ``polar`` options of the kernels (:mod:`quotientopt.optim.muon_kernels`): the Gram
    routes' method (``"eigh"`` or ``"newton-schulz"``) and the iteration's constants."""
    return dict(
        method="eigh" if group["polar"] == "eigh" else "newton-schulz",
        eps=group["eps"],
        ns_coefficients=group["ns_coefficients"],
        ns_steps=group["ns_steps"],
    )


def _decay(group: dict[str, Any]) -> float:
    r"""The product's decay :math:`1 - \eta\lambda` (each factor is scaled by its square root);
    refused where it would flip the products' sign."""
    decay = 1.0 - group["lr"] * group["weight_decay"]
    if decay < 0:
        raise ValueError(
            f"QuotientMuon: lr * weight_decay = {group['lr'] * group['weight_decay']:g} > 1 would "
            "flip the sign of the products; lower the learning rate or the weight decay"
        )
    return decay


def _stays_healthy(geometry, grams, new: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per head of ``new`` (the candidate point): whether its update may be written. A healthy
    head must stay healthy (full-rank finite Grams); one that starts rank-deficient (the
    regularized metric, ``P + delta I``) only has to stay finite on its way to full rank; every
    head needs finite factors (over all row shards) and ``keep`` (no non-finite gradient)."""
    new_grams = geometry.grams(new, check=False, reference=grams)
    finite = torch.isfinite(new).flatten(-2).all(-1)
    if isinstance(geometry, RowSharded):  # a head is finite when all of its row shards are
        finite = geometry.row_sum((~finite).to(grams.p.dtype)) == 0
    return torch.where(grams.ok, new_grams.ok, grams.regularized) & finite & keep


def _check_options(o: dict[str, Any]) -> None:
    """Refuse an invalid :class:`QuotientMuon` option with one error naming it (``o``: the
    constructor's options by name, ``ns_coefficients`` as given)."""
    check_number("lr", o["lr"], 0.0, float("inf"))
    check_number("momentum", o["momentum"], 0.0, 1.0, high_open=True)
    check_number("weight_decay", o["weight_decay"], 0.0, float("inf"))
    check_number("eps", o["eps"], 0.0, float("inf"), low_open=True)
    if not isinstance(o["nesterov"], bool):
        raise ValueError(f"invalid nesterov: {o['nesterov']!r}; expected True or False")
    if o["adjust_lr_fn"] not in ADJUST_LR_FNS:
        raise ValueError(
            f"invalid adjust_lr_fn: {o['adjust_lr_fn']!r}; expected None, 'original' or "
            "'match_rms_adamw' (torch.optim.Muon's choices)"
        )
    check_choice("head_scale", o["head_scale"], HEAD_SCALES)
    check_choice("polar", o["polar"], POLAR_METHODS)
    check_choice("step", o["step"], STEP_KINDS)
    check_choice("head_norm", o["head_norm"], HEAD_NORMS)
    ns_steps = o["ns_steps"]
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or not 0 < ns_steps < 100:
        raise ValueError(f"invalid ns_steps: {ns_steps!r}; expected an int in [1, 99]")
    if len(tuple(o["ns_coefficients"])) != 3:
        raise ValueError(
            f"invalid ns_coefficients: {o['ns_coefficients']!r}; expected three numbers (a, b, c)"
        )


def _check_parameter(p: torch.Tensor) -> None:
    """Refuse a parameter :class:`~quotientopt.optim.QuotientMuon` cannot step, with the fix."""
    if geometry_of(p) is not None:
        return
    if manifold_of(p) is not None:
        raise ValueError(
            f"QuotientMuon: a parameter lies on {type(p.manifold).__name__}, which is not a "
            "head geometry (FactorQuotient, SubgroupFactorQuotient); step it with geoopt's "
            "RiemannianAdam or QuotientAdam"
        )
    if p.dim() != 2:
        raise ValueError(
            f"QuotientMuon steps head parameters and 2-D matrices, got a plain tensor of shape "
            f"{tuple(p.shape)}; give embeddings, gains and biases to AdamW "
            "(quotientopt.optim.muon_and_adamw(model, lr) does this split)"
        )
    if is_dtensor(p) and not all(pl.is_replicate() or pl.is_shard() for pl in p.placements):
        raise ValueError(
            f"QuotientMuon: a plain {tuple(p.shape)} matrix is placed as {p.placements}; "
            "its step gathers sharded matrices whole (Shard and Replicate placements), "
            "not partial sums: redistribute it or give it to AdamW"
        )

"""How :func:`quotientopt.optim.muon_and_adamw` splits a model's parameters: heads, hidden
matrices (torch Muon's) and the rest (AdamW's)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from quotientopt.nn.adapters import no_attention_error
from quotientopt.optim._base import geometry_of, manifold_of
from quotientopt.optim._guard import check_declared_geometries


def _default_hidden(name: str, p: torch.Tensor) -> bool:
    """The default Muon matrices: 2-D weights of ``torch.nn.Linear`` layers except an output
    layer named ``lm_head``/``head``/``classifier``/``output`` (decided in :func:`muon_and_adamw`)."""
    last = name.rsplit(".", 2)
    return p.dim() == 2 and not any(
        part in ("lm_head", "head", "classifier", "output") for part in last[:-1]
    )


def _sort_parameters(
    model: torch.nn.Module, hidden: Callable[[str, torch.Tensor], bool] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """:func:`muon_and_adamw`'s split of ``model``'s trainable parameters (each once): head
    parameters, hidden 2-D matrices (``hidden``, default :func:`_default_hidden` on
    ``torch.nn.Linear`` weights not tied to an embedding) and the rest (AdamW's); refused where
    a part is missing or a manifold parameter would go to AdamW."""
    embedded = {id(mod.weight) for mod in model.modules() if isinstance(mod, torch.nn.Embedding)}
    linear = {id(mod.weight) for mod in model.modules() if isinstance(mod, torch.nn.Linear)}
    rule = hidden or (
        lambda name, p: id(p) in linear and id(p) not in embedded and _default_hidden(name, p)
    )
    check_declared_geometries(list(model.parameters()), "muon_and_adamw")  # recovered sectors
    heads, matrices, rest, seen = [], [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        if geometry_of(p) is not None:
            heads.append(p)
        elif manifold_of(p) is None and p.dim() == 2 and rule(name, p):
            matrices.append(p)
        else:
            rest.append(p)
    _check_split(model, heads, matrices, rest)
    return heads, matrices, rest


def _check_split(model: torch.nn.Module, heads: list, matrices: list, rest: list) -> None:
    """Refuse a split that :func:`muon_and_adamw` cannot serve, with the fix."""
    if manifold_of_any := [p for p in rest if manifold_of(p) is not None]:
        raise ValueError(
            f"muon_and_adamw: {len(manifold_of_any)} parameter(s) lie on a manifold that is not a "
            "head geometry; AdamW would leave the manifold. Step them with geoopt's RiemannianAdam"
        )
    if not heads and not matrices:
        raise ValueError(
            "muon_and_adamw: no head parameters and no hidden 2-D matrices found; declare the "
            "heads as quotient parameters (quotientopt.nn) or pass hidden=... to choose matrices"
        )
    if not heads:  # issue 26.8: no attention is an error, as in SymmetryMonitor
        raise no_attention_error("muon_and_adamw", model)
    if not rest:
        raise ValueError(
            "muon_and_adamw: every parameter goes to QuotientMuon; use QuotientMuon alone"
        )

"""The guard: a parameter declared as a head sector never reaches a quotient optimizer without its
geometry.

Every module records its sectors by name (:mod:`quotientopt.sector_registry`) and a parameter
registered under a recorded name through torch's ``register_parameter`` / ``setattr`` gets the
manifold back. A parameter object written into a module's ``_parameters`` directly (torch's
``fully_shard`` on a plain ``nn.Module``, ``to_empty``, the parameter-overwriting conversions)
arrives as a plain tensor; a quotient optimizer would then step it as a Euclidean tensor without
a word. :func:`check_declared_geometries` (called by every quotient optimizer for each parameter
group it is given, and by :func:`quotientopt.optim.split_parameters` and
:func:`quotientopt.optim.muon_and_adamw`) looks each parameter up
in the declaring modules' own ``_parameters`` and

* gives a declared sector that arrives without a geometry its declared manifold back;
* refuses, with a ``ValueError`` naming the module, the parameter and the fix, one that arrives on
  a different geometry than its module declares;
* checks the placements of a sharded (DTensor) sector at once
  (:func:`quotientopt.distributed.local_geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quotientopt.distributed import is_dtensor, local_geometry
from quotientopt.sector_registry import declared_geometries, is_sector_manifold

__all__ = ["check_declared_geometries"]


def check_declared_geometries(params: Sequence[torch.Tensor], who: str) -> None:
    """Give each parameter of ``params`` that a live module declares as a sector its declared
    manifold when it arrives without one; raise a ``ValueError`` (naming ``who``, the optimizer
    or function given ``params``) when it arrives on another."""
    declared = declared_geometries(params)
    if not declared:
        return
    for p in params:
        sector = declared.get(id(p))
        if sector is None:
            continue
        current = getattr(p, "manifold", None)
        if current is not sector.manifold:
            if is_sector_manifold(current):
                raise ValueError(
                    f"{who}: parameter {sector.name!r} of "
                    f"{type(sector.module).__name__} is declared as a sector on "
                    f"{sector.manifold!r} but carries {current!r}; to change a sector's geometry, "
                    "rebuild the module with it (its constructor's geometry arguments)"
                )
            p.manifold = sector.manifold
        if is_dtensor(p):
            local_geometry(p)  # a placement the quotient step cannot follow: refused now

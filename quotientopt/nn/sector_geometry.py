"""The geometry of a head sector belongs to the module that declares it, not to one Python object.

The record itself (per module and parameter name, for any module, through torch's global
parameter registration hook) is :mod:`quotientopt.sector_registry`; its names are re-exported
here. :class:`DeclaresSectors`, the base of :class:`~quotientopt.nn.QuotientMultiheadAttention`,
also puts the manifold back at once after the tools that write a module's ``_parameters``
directly, so that its sectors never lack their geometry, even before an optimizer sees them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from quotientopt.sector_registry import (
    GEOMETRIES_ATTR,
    DeclaredSector,
    SectorRecord,
    attach_declared,
    declare_sectors,
    declared_geometries,
    is_sector_manifold,
)

__all__ = [
    "GEOMETRIES_ATTR",
    "DeclaredSector",
    "DeclaresSectors",
    "SectorRecord",
    "attach_declared",
    "declare_sectors",
    "declared_geometries",
    "is_sector_manifold",
]


class DeclaresSectors(nn.Module):
    """Base for modules that declare head sectors (assigning a ``geoopt.ManifoldParameter`` on a
    non-Euclidean manifold declares it, as on any module) whose sectors get the declared manifold
    back at once after every tool that replaces their parameter objects:

    * ``fully_shard`` registers its sharded parameters through ``setattr`` (and so the
      registration hook) because this class overrides ``__setattr__``;
    * after ``_apply`` (``to_empty``, ``to``, the conversions that overwrite or swap parameters);
    * after ``_load_from_state_dict`` (``load_state_dict`` with swapped tensors).
    """

    def __setattr__(self, name: str, value: Any) -> None:
        # overridden (as nn.Module's) so that fully_shard registers its parameters through
        # setattr and so register_parameter, not by writing _parameters directly
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)
        attach_declared(self)
        return result

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        attach_declared(self)

"""The geometry of a head sector belongs to the module that declares it, not to one Python object.

A head sector is declared as a ``geoopt.ManifoldParameter``, whose ``manifold`` attribute lives on
that one Python object. Many of torch's tools replace the parameter object and keep only the
module and the parameter's name: ``torch.distributed.fsdp.fully_shard`` (a new ``nn.Parameter``
holding a ``DTensor``, and at every forward the unsharded one), ``load_state_dict(assign=True)``,
``Module.to_empty`` after construction on the meta device, ``Module.to`` / ``double`` with
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` or
``set_swap_module_params_on_conversion(True)`` (the latter also in ``load_state_dict``). On such a
new object the manifold is gone and a quotient optimizer would step the heads as plain tensors.

So the declaring module records, per parameter name, the manifold of each sector
(:func:`declare_sectors`, ``module._quotientopt_geometries``) and puts it back on whatever
parameter object is registered under that name:

* :class:`DeclaresSectors` (a base of :class:`~quotientopt.nn.QuotientMultiheadAttention`) does
  it whenever a parameter is (re-)registered through ``setattr`` (``fully_shard``, which takes the
  ``setattr`` path for a module that overrides ``__setattr__``, and ``assign=True``), after
  ``_apply`` (``to_empty``, ``to``, conversions) and after ``_load_from_state_dict``; the record
  travels with ``copy.deepcopy`` and pickling;
* any other module that :func:`quotientopt.distributed.fully_shard` shards is declared by it;
* every declaring module is kept in a weak registry, and :func:`declared_geometries` maps each
  parameter registered on one of them to its declared manifold: the quotient optimizers recover
  the geometry from it, and refuse a parameter that carries a different one
  (:mod:`quotientopt.optim._guard`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

import geoopt
import torch
from torch import nn

__all__ = [
    "DeclaredSector",
    "DeclaresSectors",
    "attach_declared",
    "declare_sectors",
    "declared_geometries",
    "is_sector_manifold",
]

GEOMETRIES_ATTR = "_quotientopt_geometries"

#: every live module that declares sectors (weakly: a module that is collected leaves it)
_DECLARING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_sector_manifold(manifold: object) -> bool:
    """Whether ``manifold`` is a geometry worth keeping: a geoopt manifold other than Euclidean."""
    return isinstance(manifold, geoopt.manifolds.Manifold) and not isinstance(
        manifold, geoopt.manifolds.Euclidean
    )


def _record(module: nn.Module) -> dict[str, geoopt.manifolds.Manifold]:
    record = module.__dict__.get(GEOMETRIES_ATTR)
    if record is None:
        record = {}
        object.__setattr__(module, GEOMETRIES_ATTR, record)
    _DECLARING.add(module)
    return record


def declare_sectors(module: nn.Module, geometries: dict[str, geoopt.manifolds.Manifold]) -> None:
    """Record that ``module``'s parameter ``name`` is a sector on ``geometries[name]`` (for each
    name), register ``module`` as declaring, and attach the manifolds to its current parameters."""
    for name, manifold in geometries.items():
        if not is_sector_manifold(manifold):
            raise ValueError(
                f"declare_sectors: {name!r} is declared on {manifold!r}, which is not a "
                "non-Euclidean geoopt manifold; declare only sectors with a geometry"
            )
    _record(module).update(geometries)
    attach_declared(module)


def _attach(param: torch.Tensor, manifold: geoopt.manifolds.Manifold) -> None:
    """Put ``manifold`` on ``param`` (a new parameter object registered under a sector's name)."""
    current = getattr(param, "manifold", None)
    if current is manifold:
        return
    if is_sector_manifold(current):
        raise ValueError(
            f"a parameter registered under a sector declared on {manifold!r} carries another "
            f"geometry, {current!r}; to change a sector's geometry, rebuild the module with it"
        )
    param.manifold = manifold


def attach_declared(module: nn.Module) -> None:
    """Put each declared manifold back on the parameter now registered under its name."""
    for name, manifold in module.__dict__.get(GEOMETRIES_ATTR, {}).items():
        param = module._parameters.get(name)
        if param is not None:
            _attach(param, manifold)


class DeclaredSector(NamedTuple):
    """Where a parameter is declared as a sector: the module, the name, the manifold."""

    module: nn.Module
    name: str
    manifold: geoopt.manifolds.Manifold


def declared_geometries(params: Iterable[torch.Tensor] | None = None) -> dict[int, DeclaredSector]:
    """``{id(p): DeclaredSector}`` for every parameter ``p`` registered now, under a declared
    sector's name, on a live declaring module (restricted to ``params`` when given). Read from the
    modules' own ``_parameters``, so it follows every replacement of the parameter objects."""
    wanted = None if params is None else {id(p) for p in params}
    found: dict[int, DeclaredSector] = {}
    for module in list(_DECLARING):
        for name, manifold in module.__dict__.get(GEOMETRIES_ATTR, {}).items():
            param = module._parameters.get(name)
            if param is not None and (wanted is None or id(param) in wanted):
                found[id(param)] = DeclaredSector(module, name, manifold)
    return found


class DeclaresSectors(nn.Module):
    """Base for modules that declare head sectors: assigning a ``geoopt.ManifoldParameter`` on a
    non-Euclidean manifold declares it (by attribute name), and every parameter object registered
    later under that name gets the declared manifold back (see the module docstring)."""

    def __setattr__(self, name: str, value: Any) -> None:
        # overridden (as nn.Module's) so that fully_shard registers its parameters through
        # setattr and so register_parameter, not by writing _parameters directly
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        super().register_parameter(name, param)
        if param is None:
            return
        if is_sector_manifold(getattr(param, "manifold", None)):
            _record(self)[name] = param.manifold  # a sector declared (or re-declared)
            return
        declared = self.__dict__.get(GEOMETRIES_ATTR, {})
        if name in declared:
            _attach(param, declared[name])

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)
        attach_declared(self)
        return result

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        attach_declared(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if GEOMETRIES_ATTR in self.__dict__:
            _DECLARING.add(self)
            attach_declared(self)

"""Which parameters are head sectors, recorded per module and parameter name, not per Python object.

A head sector is declared as a ``geoopt.ManifoldParameter``, whose ``manifold`` attribute lives on
that one Python object. Many of torch's tools replace the parameter object and keep only the
module and the parameter's name: ``torch.distributed.fsdp.fully_shard`` (a new ``nn.Parameter``
holding a ``DTensor``), ``load_state_dict(assign=True)``, ``Module.to_empty`` after construction on
the meta device, ``Module.to`` / ``double`` under
``torch.__future__.set_overwrite_module_params_on_conversion(True)`` or
``set_swap_module_params_on_conversion(True)``. On the new object the manifold is gone.

So the geometry is recorded on the module, by name (``module._quotientopt_geometries``, a
:class:`SectorRecord`), and every recording module is kept in a weak registry:

* **Any module.** Importing :mod:`quotientopt.manifolds` installs one global parameter
  registration hook (torch's ``register_module_parameter_registration_hook``). Registering a
  ``ManifoldParameter`` on a non-Euclidean manifold on *any* module (``self.w = ...`` in a user's
  ``__init__``) records it; a parameter registered later under a recorded name (``setattr``,
  ``register_parameter``, ``load_state_dict(assign=True)``) gets the recorded manifold back. For
  every other parameter the hook costs one attribute miss and one dict lookup.
* **Copies.** The record travels with ``copy.deepcopy``, ``pickle`` and ``torch.save`` and
  registers the copied module.
* **Direct writes.** Tools that write ``module._parameters[name]`` themselves run no hook
  (``fully_shard`` on a module that does not override ``__setattr__``, ``to_empty``, the
  conversions): :func:`declared_geometries` reads the modules' own ``_parameters``, and every
  quotient optimizer puts the manifold back, or refuses a different one, when it is built
  (:mod:`quotientopt.optim._guard`). :class:`~quotientopt.nn.sector_geometry.DeclaresSectors`, the
  base of quotientopt's attention modules, also restores it at once after those tools.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterable
from typing import Any, NamedTuple

import geoopt
import torch
from torch import nn
from torch.nn.modules.module import register_module_parameter_registration_hook

__all__ = [
    "GEOMETRIES_ATTR",
    "DeclaredSector",
    "SectorRecord",
    "attach_declared",
    "declare_sectors",
    "declared_geometries",
    "is_sector_manifold",
]

GEOMETRIES_ATTR = "_quotientopt_geometries"

#: every live module that records sectors (weakly: a module that is collected leaves it)
_DECLARING: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def is_sector_manifold(manifold: object) -> bool:
    """Whether ``manifold`` is a geometry worth keeping: a geoopt manifold other than Euclidean."""
    return isinstance(manifold, geoopt.manifolds.Manifold) and not isinstance(
        manifold, geoopt.manifolds.Euclidean
    )


class SectorRecord(dict):
    """``{parameter name: manifold}`` of one module's sectors, holding its module weakly.

    A copy made with its module (``copy.deepcopy``, ``pickle``, ``torch.save``) registers the
    copied module, so the copy's sectors are found by :func:`declared_geometries` too."""

    __slots__ = ("_owner",)

    def __init__(self, owner: nn.Module | None, geometries: Any = ()) -> None:
        super().__init__(geometries)
        self._owner = None if owner is None else weakref.ref(owner)
        if owner is not None:
            _DECLARING.add(owner)

    @property
    def owner(self) -> nn.Module | None:
        return None if self._owner is None else self._owner()

    def __deepcopy__(self, memo: dict[int, Any]) -> SectorRecord:
        owner = self.owner
        copied = None if owner is None else memo.get(id(owner))  # the module being copied
        return SectorRecord(copied, {k: copy.deepcopy(m, memo) for k, m in self.items()})

    def __reduce__(self) -> tuple[Any, ...]:
        # pickle memoizes a module before its state, so the owner here is the unpickled module
        return SectorRecord, (self.owner, dict(self))


def _record(module: nn.Module) -> SectorRecord:
    record = module.__dict__.get(GEOMETRIES_ATTR)
    if not isinstance(record, SectorRecord) or record.owner is not module:
        record = SectorRecord(module, record or {})
        object.__setattr__(module, GEOMETRIES_ATTR, record)
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


def _on_parameter_registration(module: nn.Module, name: str, param: nn.Parameter) -> None:
    """torch's global parameter registration hook: a parameter on a sector manifold records it
    (a declaration, or the user's re-declaration); any other parameter registered under a
    recorded name gets the recorded manifold."""
    manifold = getattr(param, "manifold", None)
    if manifold is not None and is_sector_manifold(manifold):
        _record(module)[name] = manifold
        return
    record = module.__dict__.get(GEOMETRIES_ATTR)
    if record is not None and name in record:
        _attach(param, record[name])


_HOOK = register_module_parameter_registration_hook(_on_parameter_registration)

"""Distributed training of quotient sectors: DDP, FSDP2 (``fully_shard``, DTensor), DCP.

* **DDP** needs nothing: gradients are all-reduced before ``optimizer.step()``, every rank runs the
  same deterministic step, and the parameters stay bitwise identical.
* **FSDP2.** ``torch.distributed.fsdp.fully_shard`` replaces every parameter by a new
  ``nn.Parameter`` holding a ``DTensor`` and keeps nothing of the old object (the ``manifold``
  attribute of a ``geoopt.ManifoldParameter`` is gone; only the module and the parameter's name
  survive). Every module records its sectors' geometry by name
  (:mod:`quotientopt.sector_registry`): quotientopt's attention modules put it back on the new
  sharded parameters at once, and the quotient optimizers do for any other module, so torch's
  own ``fully_shard`` keeps it; :func:`fully_shard` here is torch's plus the manifolds put back
  at once and an early check of the placements.
  :func:`local_geometry` (and so :func:`quotientopt.optim.geometry_of`) then gives the geometry of
  a DTensor parameter's *local shard*, driven by its placements: sharded on a head (batch) axis,
  FSDP2's default ``Shard(0)``, it is the sector's own manifold and every ``k x k`` computation
  stays local; sharded along the rows (``Shard(-2)``, e.g. chosen with ``shard_placement_fn``) it is
  the manifold of this rank's rows with a ``row_reduce`` that all-reduces over the mesh dimensions
  that shard the rows; replicated mesh dimensions (HSDP, DDP-style meshes) need nothing.
* **Optimizer steps.** :func:`steps_local_shards` decorates an optimizer's ``step``: DTensor
  parameters are replaced, for the duration of the step, by plain views of their local shards
  (carrying the local gradient and geometry) so that the step's own code, torch's fused kernels
  included, runs unchanged on local tensors; the state is kept as DTensors between steps, with the
  parameter's placements for parameter-shaped entries and the head placements for per-head
  ``k x k`` entries, so that ``torch.distributed.checkpoint`` saves, reloads and reshards it.
* **Hand-sharded rows** (without FSDP): ``FactorQuotient(n_local, m_local,
  row_reduce=all_reduce_sum())``.
"""

from __future__ import annotations

import copy
import functools
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from quotientopt.manifolds.protocol import HeadGeometry, RowSharded, is_head_geometry

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "PARAMETER_SHAPED_STATE",
    "all_reduce_sum",
    "fully_shard",
    "is_dtensor",
    "local_geometry",
    "local_shards",
    "max_over_head_shards",
    "nonfinite_on_any_rank",
    "steps_local_shards",
]

#: state entries of a head parameter that have the parameter's shape (the others are per-head
#: ``k x k`` data or scalars); an optimizer may extend it with a ``parameter_shaped_state`` attribute
PARAMETER_SHAPED_STATE = ("momentum_buffer", "exp_avg", "velocity")

_LOCAL_ATTR = "_quotientopt_local_geometry"
_HEAD_GROUPS_ATTR = "_quotientopt_head_groups"


def is_dtensor(value: object) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor``, without importing that module
    (about a second) when nothing has: then no DTensor can exist."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def all_reduce_sum(
    group: dist.ProcessGroup | Sequence[dist.ProcessGroup] | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``row_reduce`` for :class:`~quotientopt.manifolds.FactorQuotient`: sums a tensor in place
    over the ranks of ``group`` (default: the world; a sequence of groups: over each in turn, which
    sums over their product for the groups of a device mesh's dimensions) and returns it."""
    groups = list(group) if isinstance(group, (list, tuple)) else [group]

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        for g in groups:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=g)
        return tensor

    return reduce


# ------------------------------------------------------------------------------- geometry
def _row_sharded(manifold: HeadGeometry, n: int, m: int, reduce: Callable) -> HeadGeometry:
    """A copy of ``manifold`` for a shard holding ``n`` rows of ``A`` and ``m`` of ``B`` (either may
    be 0) whose row contractions are summed by ``reduce``."""
    local = copy.copy(manifold)
    local.sector_rows = (manifold.n, manifold.m)
    local.n, local.m = n, m
    local.row_reduce = reduce
    return local


def _check_placements(p: DTensor) -> tuple[list[int], int]:
    """The mesh dimensions that shard the rows of a head parameter, and the number of batch (head)
    dims; raises a ``ValueError`` for placements the quotient step cannot follow."""
    from torch.distributed.tensor import Replicate, Shard

    batch = p.ndim - 2
    row_dims = []
    for mesh_dim, placement in enumerate(p.placements):
        if type(placement) is Replicate:
            continue
        if type(placement) is not Shard:
            raise ValueError(
                f"a head sector placed as {placement} on mesh dimension {mesh_dim} cannot be "
                "stepped on its local shard; quotientopt supports Replicate() and Shard(d) "
                "placements (d a head axis or the row axis)"
            )
        dim = placement.dim % p.ndim
        if dim == p.ndim - 1:
            raise ValueError(
                f"a head sector of shape {tuple(p.shape)} sharded along its k columns "
                f"(Shard({placement.dim})) cannot be stepped: every k x k matrix of the step would "
                "need all of its columns; shard the head axis (Shard(0), FSDP2's default) or the "
                f"rows (Shard({p.ndim - 2})) instead, e.g. with fully_shard(shard_placement_fn=...)"
            )
        if dim == batch:
            row_dims.append(mesh_dim)
    return row_dims, batch


def local_geometry(p: torch.Tensor) -> HeadGeometry | None:
    """The head geometry of ``p``'s local data: for a plain tensor its ``manifold`` (if that is a
    head geometry), for a DTensor the geometry of ``p.to_local()`` (None when ``p`` has none).

    Sharded on head axes or replicated, that is the sector's manifold itself (no communication).
    With the rows sharded on some mesh dimensions, it is the manifold of this rank's rows (which
    may hold no row of ``A`` or of ``B``) whose ``row_reduce`` all-reduces over exactly those mesh
    dimensions. Raises a ``ValueError`` for a placement the step cannot follow (the ``k`` columns
    sharded, ``Partial``, strided shards) and for a manifold that is already row-sharded by hand.
    The result is cached on ``p`` per placement."""
    manifold = getattr(p, "manifold", None)
    if not is_head_geometry(manifold):
        return None
    if not is_dtensor(p):
        return manifold
    key = (id(manifold), tuple(p.placements), id(p.device_mesh), tuple(p.shape))
    cached = p.__dict__.get(_LOCAL_ATTR)
    if cached is not None and cached[0] == key:
        return cached[1]
    row_dims, batch = _check_placements(p)
    if not row_dims:
        geometry = manifold
    else:
        if isinstance(manifold, RowSharded):
            raise ValueError(
                "this head sector is sharded twice: its manifold already has a row_reduce, and "
                "its DTensor placements shard the rows too; declare it with the whole sector's "
                "FactorQuotient(n, m) and let the placements drive the reduction"
            )
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        start, length = offset[batch], shape[batch]
        n_local = max(0, min(start + length, manifold.n) - start)
        groups = [p.device_mesh.get_group(d) for d in row_dims]
        geometry = _row_sharded(manifold, n_local, length - n_local, all_reduce_sum(groups))
    p.__dict__[_LOCAL_ATTR] = (key, geometry)
    return geometry


# ---------------------------------------------------------------------------- fully_shard
def fully_shard(module: nn.Module | list[nn.Module], **kwargs: Any) -> Any:
    """``torch.distributed.fsdp.fully_shard``, checked for the head sectors' placements.

    Same arguments and result as torch's, which keeps the geometry by itself: every module holding
    a ``geoopt.ManifoldParameter`` records its sectors by name when they are registered
    (:mod:`quotientopt.sector_registry`), and the quotient optimizers put the manifold back on the
    sharded parameters that torch writes in their place. This one also declares sectors written
    into a module's ``_parameters`` by hand, puts the manifolds on the sharded parameters at once,
    keeps them through ``load_state_dict`` with swapped tensors, and checks at once that the
    placements can be stepped (a ``ValueError`` otherwise, see :func:`local_geometry`), where
    torch's would let the optimizer find out. Apply it bottom-up like torch's (blocks first, then
    the root)."""
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    from quotientopt.nn.sector_geometry import DeclaresSectors
    from quotientopt.sector_registry import (
        GEOMETRIES_ATTR,
        attach_declared,
        declare_sectors,
        is_sector_manifold,
    )

    modules = module if isinstance(module, list) else [module]
    owners: list[nn.Module] = []
    for root in modules:
        for owner in root.modules():
            found = {
                name: p.manifold
                for name, p in owner._parameters.items()
                if p is not None and is_sector_manifold(getattr(p, "manifold", None))
            }
            if found:
                if not isinstance(owner, DeclaresSectors) and owner not in _LOAD_HOOKED:
                    owner.register_load_state_dict_post_hook(lambda mod, _: attach_declared(mod))
                    _LOAD_HOOKED.add(owner)
                declare_sectors(owner, found)
                owners.append(owner)
    result = torch_fully_shard(module, **kwargs)
    for owner in owners:
        attach_declared(owner)  # torch writes _parameters directly for a plain nn.Module
        for name in getattr(owner, GEOMETRIES_ATTR):
            local_geometry(owner._parameters[name])  # refuse unsupported placements now
    return result


#: the modules given a load_state_dict post hook that restores their sectors' manifolds
_LOAD_HOOKED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


# -------------------------------------------------------------------------- local stepping
_ALIASES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _alias(p: DTensor) -> torch.Tensor:
    """A plain tensor viewing ``p``'s local shard (same storage and version counter), the same
    object at every step (optimizers key their caches by it) while the shard is the same."""
    local = p._local_tensor
    cached = _ALIASES.get(p)
    if cached is None or cached[0] is not local:
        alias = local.view(local.shape)
        cached = _ALIASES[p] = (local, alias)
    alias = cached[1]
    alias._quotientopt_layout = (p.device_mesh, tuple(p.placements), p.shape)  # _sharded_muon
    geometry = local_geometry(p)
    if geometry is not None:
        alias.manifold = geometry
        from torch.distributed.tensor import Shard

        batch = p.ndim - 2
        setattr(
            alias,
            _HEAD_GROUPS_ATTR,
            [
                p.device_mesh.get_group(mesh_dim)
                for mesh_dim, pl in enumerate(p.placements)
                if isinstance(pl, Shard) and pl.dim % p.ndim < batch
            ],
        )
    elif "manifold" in alias.__dict__:
        del alias.manifold
    return alias


def max_over_head_shards(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a per-tensor decision value computed from this rank's heads, e.g. the largest
    metric drift) maximized over the ranks that hold the other heads of ``p`` (NaN counts as
    ``inf``), so that every rank takes the decision the whole tensor would. ``p`` as an optimizer
    sees it inside :func:`local_shards`; for any other tensor ``value`` is returned unchanged."""
    groups = getattr(p, _HEAD_GROUPS_ATTR, None)
    if not groups:
        return value
    value = torch.nan_to_num(value.detach().clone(), nan=torch.inf)
    for group in groups:
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return value


def _to_local(value: Any, seen: dict[int, DTensor]) -> Any:
    """``value`` with its DTensors replaced by their local tensors, each recorded in ``seen`` (by
    the local tensor's id) so that a state tensor updated in place is not wrapped anew."""
    if is_dtensor(value):
        seen[id(value._local_tensor)] = value
        return value._local_tensor
    if isinstance(value, dict):
        return {key: _to_local(item, seen) for key, item in value.items()}
    return value


def _per_head_placements(p: DTensor) -> tuple:
    from torch.distributed.tensor import Replicate, Shard

    batch = p.ndim - 2
    return tuple(
        Replicate() if isinstance(pl, Shard) and pl.dim % p.ndim >= batch else pl
        for pl in p.placements
    )


_SPECS_ATTR = "_quotientopt_state_specs"


def _wrap(local: torch.Tensor, p: DTensor, kind: str, shape: torch.Size) -> DTensor:
    """``local`` as a DTensor on ``p``'s mesh, with ``p``'s placements (``kind="param"``) or its
    head placements (``"head"``: row shards replicated). ``DTensor.from_local`` cost about 10 ms a
    call here; this is the direct construction that FSDP2 uses (a few microseconds), with the
    spec cached on ``p``."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    specs = p.__dict__.setdefault(_SPECS_ATTR, {})
    key = (kind, shape, local.dtype)
    spec = specs.get(key)
    if spec is None:
        placements = tuple(p.placements) if kind == "param" else _per_head_placements(p)
        stride = torch.empty(shape, device="meta").stride()
        meta = TensorMeta(shape, stride, local.dtype)
        spec = specs[key] = DTensorSpec(p.device_mesh, placements, tensor_meta=meta)
    return DTensor(local, spec, requires_grad=False)


def _distribute(
    value: Any, p: DTensor, key: str, head: bool, parameter_shaped: tuple, seen: dict
) -> Any:
    """A state entry of ``p`` (local tensors) as DTensors: parameter-shaped entries with ``p``'s
    placements, per-head entries of a head parameter with its head placements (row shards
    replicated: the ``k x k`` data is the same on every row shard), scalars as they are."""
    if isinstance(value, dict):
        return {k: _distribute(v, p, key, head, parameter_shaped, seen) for k, v in value.items()}
    if not isinstance(value, torch.Tensor) or is_dtensor(value) or value.dim() == 0:
        return value
    previous = seen.get(id(value))
    if previous is not None and previous._local_tensor is value and previous.dtype == value.dtype:
        return previous  # updated in place: the DTensor from before the step still wraps it
    local_shape = p._local_tensor.shape
    if head:
        batch = p.ndim - 2
        if key in parameter_shaped:
            if value.shape != local_shape:
                raise ValueError(
                    f"state entry {key!r} of shape {tuple(value.shape)} was declared parameter-"
                    f"shaped, but the local shard has shape {tuple(local_shape)}"
                )
            kind, shape = "param", p.shape
        elif value.dim() >= batch and value.shape[:batch] == local_shape[:batch]:
            kind, shape = "head", p.shape[:batch] + value.shape[batch:]
        else:
            return value
    elif value.shape == local_shape:
        kind, shape = "param", p.shape
    else:
        return value
    return _wrap(value, p, kind, torch.Size(shape))


def _parameter_shaped(optimizer: torch.optim.Optimizer) -> tuple[str, ...]:
    return PARAMETER_SHAPED_STATE + tuple(getattr(optimizer, "parameter_shaped_state", ()))


_ACTIVE_MESHES: list[list] = []  # the device meshes of the local_shards contexts being run


def nonfinite_on_any_rank(
    flags: dict[torch.device, torch.Tensor],
) -> dict[torch.device, torch.Tensor]:
    """Inside :func:`local_shards`: the per-device non-finite-gradient flags of
    :func:`quotientopt.optim._base.found_nonfinite` maximized over every rank of the parameters'
    device meshes (in place), so that a NaN in one rank's gradient shard skips the step on every
    rank, as it would skip it for the whole tensor. Elsewhere: ``flags`` unchanged."""
    if not _ACTIVE_MESHES:
        return flags
    for mesh in _ACTIVE_MESHES[-1]:
        for flag in flags.values():
            for mesh_dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(mesh_dim))
    return flags


@contextmanager
def local_shards(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Within the block, ``optimizer``'s DTensor parameters are plain views of their local shards
    (with the local gradient as ``.grad`` and :func:`local_geometry` as ``.manifold``) and their
    state holds local tensors; on exit the parameters are restored and the state is stored as
    DTensors again (see :func:`steps_local_shards`)."""
    groups = optimizer.param_groups
    originals = [group["params"] for group in groups]
    swapped: list[tuple[DTensor, torch.Tensor]] = []
    seen: dict[int, DTensor] = {}
    state = optimizer.state
    try:
        for group, params in zip(groups, originals, strict=True):
            local_params = []
            for p in params:
                if is_dtensor(p):
                    alias = _alias(p)
                    grad = p.grad
                    alias.grad = None if grad is None else grad._local_tensor
                    if p in state:
                        state[alias] = _to_local(state.pop(p), seen)
                    swapped.append((p, alias))
                    p = alias
                local_params.append(p)
            group["params"] = local_params
        meshes = {id(p.device_mesh): p.device_mesh for p, _ in swapped}
        _ACTIVE_MESHES.append(list(meshes.values()))
        try:
            yield
        finally:
            _ACTIVE_MESHES.pop()
    finally:
        for group, params in zip(groups, originals, strict=True):
            group["params"] = params
        parameter_shaped = _parameter_shaped(optimizer)
        for p, alias in swapped:
            alias.grad = None
            if alias in state:
                head = local_geometry(p) is not None
                state[p] = {
                    key: _distribute(value, p, key, head, parameter_shaped, seen)
                    for key, value in state.pop(alias).items()
                }


Step = TypeVar("Step", bound=Callable[..., Any])


def steps_local_shards(step: Step) -> Step:
    """Decorator for an optimizer's ``step(closure=None)``: with DTensor parameters (FSDP2,
    ``distribute_tensor``), evaluate the closure, then run ``step`` on their local shards inside
    :func:`local_shards`; without them, call ``step`` unchanged.

    Torch's fused kernels have no DTensor sharding rules and the quotient step needs each head's
    factors, so the step runs on the local tensors: with the geometry of :func:`local_geometry`
    every ``k x k`` contraction over sharded rows is all-reduced, everything else is local."""

    @functools.wraps(step)
    def wrapper(self: torch.optim.Optimizer, closure: Callable | None = None) -> Any:
        if not any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            return step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad(), local_shards(self):
            step(self, None)
        return loss

    return wrapper  # type: ignore[return-value]

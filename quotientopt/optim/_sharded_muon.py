r"""QuotientMuon on FSDP2 shards: the data the polar needs, gathered whole (issue 26 point 7).

Inside :func:`quotientopt.distributed.steps_local_shards` an optimizer sees plain views of each
rank's shard. Two parts of the Muon step need more than the shard:

* **the all-heads polar of a head tensor split over ranks on its head axis** (FSDP2's default
  ``Shard(0)`` of an ``(H, n + m, k)`` sector): :math:`\operatorname{polar}(X)` of
  :math:`X = [X_1, \dots, X_H]` (``n x Hk``) couples every head, and its Gram :math:`X^\top X`
  has the cross blocks :math:`X_h^\top X_g` of heads on different ranks. :class:`HeadShards`
  all-gathers the whitened :math:`X_h` (``n x k`` per head, as many numbers as the gradient's
  ``A`` rows) over the mesh dimension that shards the heads, every rank computes the same polar
  of the whole :math:`X` and keeps the blocks of its own heads. The whitening
  (:math:`L_h^{-1}`, ``k x k`` per head) stays local.
* **a plain matrix sharded by FSDP2** (the MLP matrices of ``muon_and_adamw``):
  :func:`sharded_matrix_step` is torch Muon's step with the Newton-Schulz input gathered, as
  distributed-Muon implementations do: momentum on the local shard, an all-gather of the
  ``rows x cols`` update, ``torch.optim._muon._zeropower_via_newtonschulz`` on the whole
  matrix (the same call torch Muon makes), this rank's shard of the result, torch Muon's
  ``_adjust_lr`` of the whole shape and its decoupled decay.

Both give every rank the result one process computes from the same gradients (the gathered
input is the same tensor), at the price of one all-gather of an update-sized tensor per side or
matrix and redundant polar work on every rank (``benchmarks/fsdp_overhead.py`` measures it).
The layout comes from :func:`local_layout` (the DTensor's mesh, placements and global shape,
recorded on the local view by ``quotientopt.distributed``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import _muon as torch_muon_module

from quotientopt.distributed import is_dtensor

__all__ = ["HeadShards", "head_shards", "is_sharded", "local_layout", "sharded_matrix_step"]


def local_layout(p: torch.Tensor) -> tuple | None:
    """``(device_mesh, placements, global shape)`` of a DTensor ``p`` or of the local view of one
    that ``steps_local_shards`` gives an optimizer; None for any other tensor."""
    if is_dtensor(p):
        return p.device_mesh, tuple(p.placements), p.shape
    return p.__dict__.get("_quotientopt_layout")


def _spec(mesh, placements: tuple, shape: torch.Size, dtype: torch.dtype):
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    stride = torch.empty(shape, device="meta").stride()
    return DTensorSpec(mesh, placements, tensor_meta=TensorMeta(shape, stride, dtype))


def _gather(local: torch.Tensor, mesh, placements: tuple, shape: torch.Size) -> torch.Tensor:
    """The whole tensor of global ``shape`` whose shard on this rank is ``local``."""
    from torch.distributed.tensor import DTensor

    spec = _spec(mesh, placements, shape, local.dtype)
    return DTensor(local.contiguous(), spec, requires_grad=False).full_tensor()


def _local(whole: torch.Tensor, mesh, placements: tuple) -> torch.Tensor:
    """This rank's shard of ``whole`` under ``placements``."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(whole.shape, mesh, placements)
    out = whole
    for dim, (length, start) in enumerate(zip(shape, offset, strict=True)):
        if length != whole.shape[dim]:
            out = out.narrow(dim, start, length)
    return out


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` (a local view inside ``steps_local_shards``, or a DTensor) is a shard of a
    larger tensor on some mesh dimension of size > 1."""
    layout = local_layout(p)
    if layout is None:
        return False
    mesh, placements, _ = layout
    return any(pl.is_shard() and mesh.size(d) > 1 for d, pl in enumerate(placements))


class HeadShards:
    r"""Gathers the blocks :math:`X_h` (``(..., H_local, rows, k)``) of a head tensor sharded on
    its head axis (axis -3) into the whole :math:`X` (``(..., H, rows, k)``) and takes this
    rank's heads back out of a whole result."""

    def __init__(self, mesh, placements: tuple, heads: int) -> None:
        self.mesh, self.placements, self.heads = mesh, placements, heads

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        shape = torch.Size((*x.shape[:-3], self.heads, *x.shape[-2:]))
        return _gather(x, self.mesh, self.placements, shape)

    def local(self, y: torch.Tensor) -> torch.Tensor:
        return _local(y, self.mesh, self.placements)


def head_shards(p: torch.Tensor) -> HeadShards | None:
    """The :class:`HeadShards` of a head tensor's local view whose head axis (-3) is sharded;
    None when every head of the tensor is on this rank (unsharded, replicated, sharded on a
    leading layer axis or on the rows). A head axis sharded together with another axis (the rows
    or a layer axis) is refused with a ``ValueError``."""
    layout = local_layout(p)
    if layout is None or p.dim() < 3:
        return None
    mesh, placements, shape = layout
    from torch.distributed.tensor import Replicate, Shard

    head_axis = len(shape) - 3
    sharded = [(d, pl.dim % len(shape)) for d, pl in enumerate(placements) if pl.is_shard()]
    on_heads = [d for d, axis in sharded if axis == head_axis and mesh.size(d) > 1]
    if not on_heads:
        return None
    others = [(d, axis) for d, axis in sharded if axis != head_axis and mesh.size(d) > 1]
    if others:
        raise ValueError(
            "QuotientMuon: head_norm='all-heads' gathers a head tensor whose heads are split "
            f"over ranks, but this one ({tuple(shape)}, {tuple(placements)}) is sharded on "
            f"axis {others[0][1]} as well; shard only its head axis (FSDP2's default Shard(0) "
            "of an (H, n + m, k) sector) or only its rows, or pass head_norm='per-head'"
        )
    gather_placements = tuple(
        Shard(head_axis) if d in on_heads else Replicate() for d in range(mesh.ndim)
    )
    return HeadShards(mesh, gather_placements, shape[head_axis])


def sharded_matrix_step(p: torch.Tensor, buf: torch.Tensor, group: dict[str, Any]) -> None:
    r"""torch Muon's step of one sharded plain matrix (``p``: the local view inside
    ``steps_local_shards``, with its local gradient; ``buf``: its local momentum), in place:
    :math:`b \leftarrow \beta b + (1 - \beta) g`, :math:`u = g + \beta (b - g)` (Nesterov) or
    :math:`b`, :math:`O = \operatorname{NS}(\text{all-gather}(u))` (torch's bfloat16 quintic
    iteration on the whole matrix), :math:`W \leftarrow (1 - \eta\lambda) W - \eta'\, O_{\text{local}}`
    with :math:`\eta'` torch's ``_adjust_lr`` of the whole matrix's shape. The same operations
    as ``torch.optim._muon._single_tensor_muon`` on the whole matrix, shard by shard."""
    mesh, placements, shape = local_layout(p)
    grad, param = p.grad, p.detach()
    momentum = group["momentum"]
    buf.lerp_(grad, 1 - momentum)
    update = grad.lerp(buf, momentum) if group["nesterov"] else buf
    whole = _gather(update, mesh, placements, shape)
    ortho = torch_muon_module._zeropower_via_newtonschulz(
        whole, group["ns_coefficients"], group["ns_steps"], group["eps"]
    )
    adjusted_lr = torch_muon_module._adjust_lr(group["lr"], group["adjust_lr_fn"], shape)
    param.mul_(1 - group["lr"] * group["weight_decay"])
    param.add_(_local(ortho, mesh, placements), alpha=-adjusted_lr)

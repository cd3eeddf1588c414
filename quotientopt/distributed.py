"""Helpers for data-parallel and row-sharded (FSDP-style) training of quotient sectors.

Under ``DistributedDataParallel`` nothing is needed: gradients are all-reduced before
``optimizer.step()``, every rank then runs the same deterministic step, and the parameters stay
bitwise identical (tested with gloo). When the rows of a sector are sharded across ranks, the
``k x k`` Grams and cross products are sums over the shards: build the shard's manifold with
``FactorQuotient(n_local, m_local, row_reduce=all_reduce_sum())``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum"]


def all_reduce_sum(
    group: dist.ProcessGroup | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``row_reduce`` for :class:`~quotientopt.manifolds.FactorQuotient`: sums a tensor over the
    ranks of ``group`` (default: the world) in place and returns it."""

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    return reduce

"""Distributed training with the gloo backend, 2 processes on the CPU: DistributedDataParallel keeps
the ranks bitwise identical; row-sharded sectors reduce their Grams across shards."""

from __future__ import annotations

import os
import sys

import geoopt
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from quotientopt.distributed import all_reduce_sum
from quotientopt.manifolds import FactorQuotient
from quotientopt.optim import QuotientSGD

WORLD = 2


class TinyAttentionLike(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.manifold = FactorQuotient(6, 6)
        self.heads = geoopt.ManifoldParameter(
            self.manifold.random(2, 12, 2), manifold=self.manifold
        )
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x @ self.manifold.product(self.heads).sum(0)))


def _init(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def _finish() -> None:
    """Leave the process group and exit at once: letting the interpreter tear down gloo's
    threads at exit intermittently aborts ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _ddp_worker(rank: int, init_file: str, refresh_every: int) -> None:
    _init(rank, init_file)
    torch.manual_seed(rank)  # different initial values: DDP must broadcast rank 0's
    model = TinyAttentionLike()
    ddp = DistributedDataParallel(model)
    optimizer = QuotientSGD(
        ddp.parameters(),
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
        refresh_every=refresh_every,
    )
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(20):
        x = torch.randn(16, 6, generator=gen)
        loss = (ddp(x) - 1.0).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(WORLD)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"
    assert not torch.equal(flat, start), "nothing was trained"
    _finish()


def _sharded_worker(rank: int, init_file: str, refresh_every: int) -> None:
    _init(rank, init_file)
    n = m = 8
    gen = torch.Generator().manual_seed(0)  # the same full problem on every rank
    target = torch.randn(3, n, 2, generator=gen, dtype=torch.float64) @ torch.randn(
        3, 2, m, generator=gen, dtype=torch.float64
    )
    z0 = torch.randn(3, n + m, 2, generator=gen, dtype=torch.float64)
    full = FactorQuotient(n, m)

    def full_gradient(z: torch.Tensor) -> torch.Tensor:
        z = z.detach().requires_grad_(True)
        (0.5 * ((full.product(z) - target) ** 2).sum()).backward()
        return z.grad

    # the reference: one process holding whole factors
    reference = geoopt.ManifoldParameter(z0.clone(), manifold=full)
    reference_optimizer = QuotientSGD(
        [reference], lr=0.1, momentum=0.5, refresh_every=refresh_every
    )
    # this rank's shard: rows [rank * n/2, (rank+1) * n/2) of A and of B
    rows_a = slice(rank * n // WORLD, (rank + 1) * n // WORLD)
    rows_b = slice(n + rank * m // WORLD, n + (rank + 1) * m // WORLD)

    def shard(z: torch.Tensor) -> torch.Tensor:
        return torch.cat((z[..., rows_a, :], z[..., rows_b, :]), dim=-2)

    def gather(local: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(local) for _ in range(WORLD)]
        dist.all_gather(parts, local.contiguous())
        a = torch.cat([p[..., : n // WORLD, :] for p in parts], dim=-2)
        b = torch.cat([p[..., n // WORLD :, :] for p in parts], dim=-2)
        return torch.cat((a, b), dim=-2)

    local_manifold = FactorQuotient(n // WORLD, m // WORLD, row_reduce=all_reduce_sum())
    local = geoopt.ManifoldParameter(shard(z0), manifold=local_manifold)
    optimizer = QuotientSGD([local], lr=0.1, momentum=0.5, refresh_every=refresh_every)
    for _ in range(30):
        reference.grad = full_gradient(reference.detach())
        reference_optimizer.step()
        local.grad = shard(full_gradient(gather(local.detach())))
        optimizer.step()
    result = gather(local.detach())
    error = (full.product(result) - full.product(reference.detach())).norm() / full.product(
        reference.detach()
    ).norm()
    assert float(error) < 1e-10, f"sharded and whole runs differ by {float(error):.2e}"
    loss0 = 0.5 * ((full.product(z0) - target) ** 2).sum()
    loss = 0.5 * ((full.product(result) - target) ** 2).sum()
    assert float(loss) < 1e-3 * float(loss0), "the sharded run did not train"
    _finish()


@pytest.mark.parametrize("refresh_every", [1, 4])
def test_ddp_ranks_stay_bitwise_identical(tmp_path, refresh_every):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), refresh_every), nprocs=WORLD, join=True)


@pytest.mark.parametrize("refresh_every", [1, 4])
def test_row_sharded_sector_matches_the_whole_sector(tmp_path, refresh_every):
    mp.spawn(_sharded_worker, args=(str(tmp_path / "init"), refresh_every), nprocs=WORLD, join=True)

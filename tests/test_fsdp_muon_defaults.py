"""Issue 26 point 7: the recommended one-liner ``muon_and_adamw(model, lr=0.02)`` at its defaults
runs under FSDP2 (``quotientopt.distributed.fully_shard``, the docs' recipe: every block, then the
root, FSDP2's default ``Shard(0)``), 2 gloo ranks on the CPU, and ends where one process ends.

Under ``Shard(0)`` the all-heads polar gathers the whitened gradients of every head and the
sharded MLP matrices gather their update for torch Muon's Newton-Schulz
(``quotientopt.optim._sharded_muon``). The Newton-Schulz of the MLP matrices is torch Muon's,
in bfloat16: rounding to bfloat16 turns a last-bit difference of two float32 gradients into a
bfloat16-sized one now and then, so the reference process forms the same gradient as the ranks,
the mean of the two half-batch gradients (each rank's half, the average FSDP2's reduce-scatter
takes); from that gradient the sharded step must reproduce one process's step to 1e-5.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from quotientopt.distributed import fully_shard
from quotientopt.models import GPT, GPTConfig
from quotientopt.optim import muon_and_adamw
from tests.test_fsdp import WORLD, _finish, _init, _my_rows, batches, full_params

CONFIG = dict(n_layer=2, n_head=4, n_embd=32, block_size=16)
STEPS = 3


def make_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**CONFIG))


def _worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = muon_and_adamw(model, lr=0.02)
    heads = optimizer.heads.param_groups
    assert heads[0]["head_norm"] == "all-heads" and len(heads) == 2  # heads, MLP matrices
    assert all(isinstance(p, DTensor) for group in heads for p in group["params"])
    for idx in batches(STEPS):
        _, loss = model(idx[_my_rows(rank), :-1], idx[_my_rows(rank), 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = full_params(model)
    if rank == 0:
        torch.save(params, out)
    _finish()


def one_process() -> dict[str, torch.Tensor]:
    model = make_model()
    optimizer = muon_and_adamw(model, lr=0.02)
    for idx in batches(STEPS):
        optimizer.zero_grad()
        for rank in range(WORLD):  # the mean of the ranks' half-batch gradients
            _, loss = model(idx[_my_rows(rank), :-1], idx[_my_rows(rank), 1:])
            (loss / WORLD).backward()
        optimizer.step()
    return full_params(model)


def test_muon_and_adamw_defaults_run_sharded_and_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "params.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got, want = torch.load(out), one_process()
    start = full_params(make_model())
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst < 1e-5, f"largest difference {worst:.2e}"
    for name in ("h.0.attn.attn.qk", "h.1.mlp.c_fc.weight"):  # heads and MLP matrices moved
        assert float((want[name] - start[name]).abs().max()) > 1e-3, name

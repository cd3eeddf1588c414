"""torch's own ``torch.distributed.fsdp.fully_shard`` keeps the head geometry (issue 26, point 1).

FSDP2 replaces every parameter by a new ``nn.Parameter`` holding a DTensor; the modules of
``quotientopt.nn`` declare their sectors by name and put the manifold back on it
(``quotientopt.nn.sector_geometry``). 2 gloo ranks train the reference GPT (2 layers, 4 heads,
width 32, block 16) sharded by torch's ``fully_shard``, each rank on half of every batch, and end
on the parameters of one process that sees the whole batches. Before the declaration the heads
arrived as plain DTensors and were stepped as Euclidean tensors: QuotientSGD with momentum 0.9
ended 0.79 away, QuotientAdam 0.03.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from quotientopt.optim import QuotientMuon, QuotientSGD, geometry_of
from tests.test_fsdp import (
    _finish,
    _init,
    _my_rows,
    _spawn,
    batches,
    full_params,
    make_model,
    make_optimizer,
    train,
)

WORLD = 2
OPTIMIZERS = ("sgd", "adam", "muon")  # muon: QuotientMuon per-head on the heads, AdamW the rest


def build_optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":  # what a user writes: every parameter, one learning rate
        return QuotientSGD(model.parameters(), lr=0.05, momentum=0.9)
    return make_optimizer(name, model)


def torch_sharded_gpt() -> torch.nn.Module:
    model = make_model("gpt")
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, init_file: str, out: str) -> None:
    _init(rank, init_file)
    results = {}
    for name in OPTIMIZERS:
        model = torch_sharded_gpt()
        heads = [p for p in model.parameters() if geometry_of(p) is not None]
        assert len(heads) == 4 and all(isinstance(p, DTensor) for p in heads), name
        train(model, build_optimizer(name, model), batches(5), _my_rows(rank))
        results[name] = full_params(model)
    model = torch_sharded_gpt()  # all-heads on head-axis shards: the documented refusal
    with pytest.raises(ValueError, match="sharded on its head axis"):
        QuotientMuon([model.h[0].attn.attn.qk], head_norm="all-heads")
    if rank == 0:
        torch.save(results, out)
    _finish()


def differences(tmp_path: Path) -> dict[str, tuple[float, float]]:
    """Per optimizer: (max |2 ranks - 1 process|, how far the heads moved), over 5 steps."""
    out = tmp_path / "params.pt"
    _spawn(_worker, tmp_path, str(out))
    got = torch.load(out)
    start = full_params(make_model("gpt"))
    found = {}
    for name in OPTIMIZERS:
        model = make_model("gpt")
        train(model, build_optimizer(name, model), batches(5))
        want = full_params(model)
        worst = max(float((got[name][k] - want[k]).abs().max()) for k in want)
        moved = max(float((want[k] - start[k]).abs().max()) for k in want if ".attn." in k)
        found[name] = (worst, moved)
    return found


def test_torch_fully_shard_matches_one_process(tmp_path):
    """5 steps of QuotientSGD (momentum 0.9), QuotientAdam and QuotientMuon (per-head, AdamW on
    the rest) under torch's fully_shard on 2 gloo ranks equal one process to 1e-5."""
    for name, (worst, moved) in differences(tmp_path).items():
        assert worst < 1e-5, f"{name}: largest difference {worst:.2e}"
        assert moved > 1e-3, f"{name}: the heads did not train"


if __name__ == "__main__":  # print the differences (the numbers docs/how-to/distributed.md quotes)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for name, (worst, moved) in differences(Path(tmp)).items():
            print(f"{name}: max |2 ranks - 1 process| = {worst:.1e} (heads moved {moved:.2f})")

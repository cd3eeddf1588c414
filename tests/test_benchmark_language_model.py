"""Smoke test of benchmarks/language_model.py: a tiny setting end to end, through the worker pool."""

from __future__ import annotations

import importlib
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def language_model(monkeypatch):
    # imported by name from its folder, so that the pool's spawned workers can import it too
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("language_model")
    yield module
    sys.modules.pop("language_model", None)


TINY = ["--n-layer", "1", "--n-embd", "32", "--block-size", "32", "--batch-size", "8"]
TINY += ["--eval-batches", "4", "--eval-every", "10"]


def test_tiny_benchmark_writes_rows_with_falling_finite_losses(language_model, tmp_path):
    argv = ["--optimizers", "adamw", "quotient-sgd", "--seeds", "2", "--steps", "20"]
    argv += ["--grid-steps", "10", "--workers", "2", "--out", str(tmp_path), *TINY]
    language_model.main(argv)
    data = json.loads((tmp_path / "language_model.json").read_text())
    assert (tmp_path / "language_model.md").read_text().count("| adamw |") == 2  # table, grid
    assert (tmp_path / "language_model.png").stat().st_size > 0
    rows = {row["optimizer"]: row for row in data["rows"]}
    assert set(rows) == {"adamw", "quotient-sgd"}
    initial = math.log(256)
    for name, row in rows.items():
        assert row["best_lr"] in language_model.METHODS[name].grid
        assert len(row["grid"]) == len(language_model.METHODS[name].grid)
        assert row["seeds"] == [1, 2] and len(row["val_losses"]) == 2
        assert all(math.isfinite(v) for v in row["val_losses"]), name
        assert row["val_loss_mean"] < initial - 0.5, name
        assert row["curve_steps"] == [0, 10, 20]
        assert abs(row["curve_mean"][0] - initial) < 0.1  # starts at ln(vocab)
        assert row["curve_mean"][-1] == pytest.approx(row["val_loss_mean"])
        assert row["optimizer_state_bytes"] > 0 and row["step_ms_median"] > 0
    assert data["tokens_per_run"] == 20 * 8 * 32
    assert "command" in data and "environment" in data


def test_a_run_depends_only_on_its_seed(language_model):
    """The pool may give a run to any worker: its result must be a function of the job alone."""
    import torch

    from quotientopt.compare import split_corpus
    from quotientopt.data import stdlib_text

    train, val = split_corpus(stdlib_text(200_000), 32, 8)
    setup = language_model.Setup(n_layer=1, n_embd=32, block_size=32, batch_size=8, eval_batches=2)
    job = language_model.Job("breaking-sgd", 0.1, seed=3, steps=5, curve=False)
    first = language_model.run_job(job, setup, train, val)
    torch.manual_seed(99)  # other global state must not matter
    second = language_model.run_job(job, setup, train, val)
    assert first["val_loss"] == second["val_loss"]
    assert first["train_loss_last10"] == second["train_loss_last10"]


def test_ratio_grid_tunes_lr_and_ratio_jointly(language_model, tmp_path):
    """--ratio-grid runs every (lr, ratio) pair on seed 0, and the finals use the chosen pair."""
    argv = ["--optimizers", "muon", "--seeds", "1", "--steps", "6", "--grid-steps", "6"]
    argv += ["--grid", "muon=0.01,0.02", "--ratio-grid", "muon=0.5,2", "--workers", "1"]
    argv += ["--out", str(tmp_path), *TINY]
    data = language_model.main(argv)
    (row,) = data["rows"]
    pairs = [(lr, ratio) for lr, ratio, _ in row["ratio_grid"]]
    assert sorted(pairs) == [(0.01, 0.5), (0.01, 2.0), (0.02, 0.5), (0.02, 2.0)]
    chosen = min(row["ratio_grid"], key=lambda point: point[2])
    assert (row["best_lr"], row["ratio"]) == (chosen[0], chosen[1])
    assert all(run["ratio"] == row["ratio"] for run in data["final_runs"])
    # the ratio reaches the optimizer: the attention group runs at ratio x lr
    setup = language_model.Setup(n_layer=1, n_embd=32, block_size=32, batch_size=8)
    model = language_model.GPT(
        language_model.GPTConfig(block_size=32, vocab_size=256, n_layer=1, n_head=4, n_embd=32)
    )
    muon = language_model._build_muon(model, 0.01, replace(setup, ratios=(("muon", 3.0),))).heads
    assert [group["lr"] for group in muon.param_groups] == [0.01, pytest.approx(0.03)]
    table = (tmp_path / "language_model.md").read_text()
    assert f"{row['best_lr']:g} x {row['ratio']:g}: " in table


def test_options_reach_quotient_muon_as_numbers_and_are_described(language_model):
    """--option KEY=VALUE: ints, floats and words reach muon_and_adamw as such (QuotientMuon
    refuses ns_steps=6.0), and the report's description lists them."""
    args = language_model.parse_args(
        ["--option", "ns_steps=6", "head_weight_decay=0.5", "head_norm=per-head"]
    )
    setup = language_model.Setup(
        n_layer=1, n_embd=32, block_size=32, batch_size=8, options=args.options
    )
    config = language_model.GPTConfig(
        block_size=32, vocab_size=256, n_layer=1, n_head=4, n_embd=32, quotient=True
    )
    optimizer = language_model.METHODS["quotient-muon"].build(
        language_model.GPT(config), 0.01, setup
    )
    heads = optimizer.heads.param_groups[0]
    assert heads["ns_steps"] == 6 and isinstance(heads["ns_steps"], int)
    assert heads["weight_decay"] == 0.5 and heads["head_norm"] == "per-head"
    assert optimizer.heads.param_groups[1]["weight_decay"] == 0.1  # the matrices keep theirs
    text = language_model.describe("quotient-muon", setup)
    assert text.endswith("options: ns_steps=6, head_weight_decay=0.5, head_norm=per-head")


def test_block_muon_on_thirds_is_torch_muon_on_three_matrices(language_model):
    """muon-split-qkv's BlockMuon steps a fused (3d x d) projection exactly as torch Muon steps
    its query, key and value blocks given as three d x d parameters."""
    import torch

    gen = torch.Generator().manual_seed(0)
    fused = torch.nn.Parameter(torch.randn(24, 8, generator=gen))
    blocks = [torch.nn.Parameter(fused.detach()[i : i + 8].clone()) for i in (0, 8, 16)]
    split = language_model.BlockMuon([fused], 0.02, language_model.thirds)
    reference = torch.optim.Muon(blocks, lr=0.02, **language_model.MUON_KW)
    start = fused.detach().clone()
    for _ in range(3):
        grad = torch.randn(24, 8, generator=gen)
        fused.grad = grad.clone()
        for i, p in enumerate(blocks):
            p.grad = grad[8 * i : 8 * i + 8].clone()
        split.step()
        reference.step()
    assert torch.allclose(fused.detach(), torch.cat([p.detach() for p in blocks]), atol=1e-6)
    assert (fused.detach() - start).abs().min() > 0  # every entry moved

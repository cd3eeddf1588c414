"""The protocol's machinery (benchmarks/protocol.py): one-pass accounting, the budget's schedule,
steps-to-target interpolation, lr tuned per budget, the pytorch_optimizer peers, resume."""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import protocol

TINY = protocol.Protocol(n_layer=1, n_head=4, block_size=8, batch_size=2, eval_batches=2)


def test_stream_reads_every_byte_at_most_once_and_counts_passes():
    data = torch.arange(1000)  # each value is its own position
    stream = protocol.OnePassStream(data, batch_size=3, block_size=7)
    seen: list[int] = []
    for step in range(10):
        x, y = stream.batch(step)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the next bytes of the same row
        seen += x.flatten().tolist() + y[:, -1].tolist()
    assert len(seen) == len(set(seen)) == 10 * 3 * 8
    assert stream.passes == pytest.approx(240 / 1000)
    with pytest.raises(ValueError, match="reads from"):
        stream.batch(3)  # going back would repeat tokens
    assert stream.steps_available() == 1000 // 24
    for step in range(10, stream.steps_available()):
        stream.batch(step)
    with pytest.raises(ValueError, match="second pass"):
        stream.batch(stream.steps_available())


def test_run_reports_its_passes():
    train = torch.randint(256, (4000,))
    val = torch.randint(256, (500,))
    run = protocol.Run("adamw", 16, 25, 1e-3, 0, "tune")
    result = protocol.train_run(run, TINY, train, val)
    assert result["steps_taken"] == 25
    assert result["passes"] == pytest.approx(25 * 2 * 9 / 4000)
    assert math.isfinite(result["val_loss"])


def test_schedule_warms_up_then_reaches_the_floor_exactly_at_the_budget():
    for budget in (40, 200, 1000):
        warmup = protocol.warmup_steps(budget, 0.05)
        f = [protocol.schedule(t, budget, warmup, 0.1) for t in range(budget)]
        assert all(a < b for a, b in itertools.pairwise(f[:warmup]))
        assert f[warmup - 1] == pytest.approx(1.0) and f[warmup] == pytest.approx(1.0)
        assert all(a >= b for a, b in itertools.pairwise(f[warmup:]))
        assert f[-1] == pytest.approx(0.1, abs=1e-12)  # the last step taken runs at the floor
        assert f[-2] > 0.1
    # each budget has its own schedule: at step 200 the 400-step one is at its midpoint
    assert protocol.schedule(209, 400, 20, 0.0) == pytest.approx(0.5, abs=0.01)
    assert protocol.schedule(209, 2000, 100, 0.0) > 0.9


def test_steps_to_target_interpolates_in_log_steps():
    budgets, losses = [100, 200, 400], [3.0, 2.0, 1.0]
    at, how = protocol.steps_to_target(budgets, losses, 1.5)
    assert how == "=" and at == pytest.approx(200 * math.sqrt(2))
    at, how = protocol.steps_to_target(budgets, losses, 2.0)
    assert how == "=" and at == pytest.approx(200)
    assert protocol.steps_to_target(budgets, losses, 3.5) == (100.0, "<=")
    assert protocol.steps_to_target(budgets, losses, 0.5) == (400.0, ">")
    with pytest.raises(ValueError, match="ascend"):
        protocol.steps_to_target([200, 100], [1.0, 2.0], 1.5)


def _result(kind, method, budget, lr, seed, loss):
    return {
        "kind": kind, "method": method, "width": 64, "budget": budget, "lr": lr, "seed": seed,
        "val_loss": loss, "passes": budget / 10000, "step_ms_median": 1.0, "wall_s": 1.0,
    }  # fmt: skip


def test_lr_is_tuned_per_budget_on_the_tuning_seed_and_speedup_uses_the_best_peer():
    results = []
    # the peer's best lr moves with the budget; ours too
    for budget, peer_best, ours_best in ((100, 0.02, 0.01), (200, 0.01, 0.01), (400, 0.005, 0.02)):
        for lr in (0.005, 0.01, 0.02):
            results.append(_result("tune", "muon", budget, lr, 0, 3.0 + abs(lr - peer_best)))
            results.append(_result("tune", "quotient-muon", budget, lr, 0, 3 + abs(lr - ours_best)))
    finals = {"muon": (3.0, 2.0, 1.0), "quotient-muon": (2.5, 1.5, 0.8)}
    for method, losses in finals.items():
        for budget, loss in zip((100, 200, 400), losses, strict=True):
            lr = protocol.best_lr(results, method, 64, budget)
            results.append(_result("final", method, budget, lr, 1, loss))
            results.append(_result("final", method, budget, lr, 2, loss + 0.02))
    # a final run at an untuned lr, however good, is not the tuned point
    results.append(_result("final", "muon", 400, 0.02, 1, 0.1))
    assert [protocol.best_lr(results, "muon", 64, b) for b in (100, 200, 400)] == [
        0.02,
        0.01,
        0.005,
    ]
    summary = protocol.summarize(results, ["quotient-muon", "muon"], [64], [100, 200, 400])
    row = summary["table"]["muon:w64:b400"]
    assert row["lr"] == 0.005 and row["mean"] == pytest.approx(1.01) and row["seeds"] == [1, 2]
    assert row["at_edge"]
    assert summary["table"]["muon:w64:b200"]["at_edge"] is False
    s = summary["speedups"]["w64:b200"]  # target 2.01: ours 2.51 at 100, 1.51 at 200
    assert s["best_peer"] == "muon" and s["relation"] == "="
    expected = math.exp(math.log(100) + 0.5 * math.log(2))
    assert s["ours_steps"] == pytest.approx(expected) and s["speedup"] == pytest.approx(
        200 / expected
    )
    s = summary["speedups"]["w64:b400"]  # target 1.01: ours 1.51 at 200, 0.81 at 400
    assert s["relation"] == "=" and 200 < s["ours_steps"] < 400 and s["speedup"] > 1
    assert summary["speedups"]["w64:b100"]["relation"] == "<="  # 2.51 < 3.01 at the first rung
    md = protocol.markdown(
        {
            "command": "x",
            "cpu": protocol.cpu_line(),
            "torch": "t",
            "workers": 1,
            "corpus": "c",
            "proto": protocol.asdict(TINY),
            "grid_factors": [0.5, 1, 2],
            "final_seeds": [1, 2],
            "methods": ["quotient-muon", "muon"],
            "widths": [64],
            "budgets": [100, 200, 400],
            "finished": 1,
            "planned": 1,
        },
        summary,
    )
    assert "bf16 matrix units" in md and "| passes |" in md and "0.005 (edge)" in md


@pytest.mark.parametrize("name", ["normuon", "adamuon"])
def test_pytorch_optimizer_peers_build_and_step(name):
    model = protocol.build_model(name, 16, TINY, seed=0)
    optimizer = protocol.ALL[name].build(model, 0.02, protocol.Setup())
    inner, rest = optimizer.optimizers
    assert type(inner).__name__ == {"normuon": "NorMuon", "adamuon": "AdaMuon"}[name]
    ids = [id(p) for part in (inner, rest) for g in part.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each exactly once
    hidden = {id(p) for g in inner.param_groups for p in g["params"]}
    assert all(p.dim() == 2 for p in model.parameters() if id(p) in hidden) and hidden
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randint(256, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True)]
    assert all(changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_corpus_is_stdlib_outside_test_folders_shuffled_by_file():
    files = protocol.stdlib_files()
    root = Path(protocol.sysconfig.get_paths()["stdlib"])
    assert files and all(p.suffix == ".py" for p in files)
    assert not any(set(p.relative_to(root).parts[:-1]) & protocol.TEST_FOLDERS for p in files)
    expected = sorted(files)
    random.Random(0).shuffle(expected)
    assert files == expected
    train, val, n_val = protocol.one_pass_corpus(files[:40], val_bytes=10_000)
    held = sum(len(p.read_bytes()) for p in files[:n_val])
    assert (
        len(val) == held >= 10_000
        and len(train) == sum(len(p.read_bytes()) for p in files[:40]) - held
    )


def test_main_writes_after_runs_and_resume_skips_them(tmp_path, capsys):
    argv = ["--optimizers", "adamw", "--widths", "16", "--budgets", "3", "6", "--final-seeds", "1"]
    argv += [
        "--grid-factors",
        "1",
        "2",
        "--eval-batches",
        "1",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
    ]
    protocol.main(argv)
    data = json.loads((tmp_path / "protocol.json").read_text())
    assert len(data["runs"]) == 2 * (2 + 1)
    stream, _, _ = protocol.one_pass_corpus(protocol.stdlib_files())
    for r in data["runs"]:
        assert r["passes"] == pytest.approx(r["budget"] * 16 * 65 / len(stream))
    assert "Estimated cost" in capsys.readouterr().out
    protocol.main([*argv, "--resume"])
    again = json.loads((tmp_path / "protocol.json").read_text())
    assert again["runs"] == data["runs"]
    assert "0 runs (2 already done)" in capsys.readouterr().out
    assert "passes" in (tmp_path / "protocol.md").read_text()
    (tmp_path / "protocol.md").unlink()
    protocol.main(["--rewrite", "--out", str(tmp_path)])
    assert "(1 seed, no std)" in (tmp_path / "protocol.md").read_text()


def test_steps_to_target_uses_the_finished_rungs_of_the_ladder():
    results = [
        _result(kind, method, budget, 0.01, seed, loss)
        for method, losses in {"muon": (3.0, 2.0, 1.0), "quotient-muon": (2.5, 1.5, None)}.items()
        for budget, loss in zip((100, 200, 400), losses, strict=True)
        if loss is not None
        for kind, seed in (("tune", 0), ("final", 1))
    ]
    summary = protocol.summarize(results, ["quotient-muon", "muon"], [64], [100, 200, 400])
    assert set(summary["speedups"]) == {"w64:b100", "w64:b200"}
    s = summary["speedups"]["w64:b200"]  # target 2.0, ours 2.5 at 100 and 1.5 at 200
    assert s["ladder"] == [100, 200] and s["ours_steps"] == pytest.approx(100 * math.sqrt(2))

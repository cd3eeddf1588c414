"""Smoke test of benchmarks/small_task.py: a --quick run writes a complete, sane report."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "small_task.py"


def test_small_task_quick_run_writes_every_method(tmp_path: Path) -> None:
    expected = {"adamw", "breaking-adamw", "quotient-sgd", "quotient-adam", "sgd"}
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path), "--methods"]
    command += sorted(expected)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "small_task.json").read_text())

    skipped = {m for m in expected if any(m in note for note in data["notes"])}
    assert skipped <= {"quotient-adam"}  # only QuotientAdam may be missing, and then with a note
    assert set(data["summary"]) == expected - skipped
    assert set(data["chosen_lr"]) == expected - skipped

    runs = data["runs"]
    for method in expected - skipped:
        mine = [r for r in runs if r["method"] == method]
        assert len(mine) == data["seeds"] >= 2, method
        for r in mine:
            curves = r["curves"]
            for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
                assert all(math.isfinite(v) for v in curves[key]), (method, key)
            assert curves["train_loss"][-1] < curves["train_loss"][0], (method, r["seed"])
            assert r["effective_rank_qk"] and r["effective_rank_vo"]
        assert len(data["attention_seed0"][method][0]) == 4  # one layer, four heads
        assert (tmp_path / f"small_task-attention-{method}.png").stat().st_size > 0

    # the quotient runs do not depend on the representative they start from; AdamW's do
    gaps = {
        (row["method"], row["variant"]): row["max_abs_logit_diff"] for row in data["invariance"]
    }
    assert gaps[("quotient-sgd", "refactorized")] < 1e-6
    assert gaps[("quotient-sgd", "dressed")] < 1e-6
    if "quotient-adam" not in skipped:
        assert gaps[("quotient-adam", "refactorized")] < 1e-6
    assert gaps[("adamw", "refactorized")] > 1e-4
    assert ("breaking-adamw", "perturbed") in gaps  # the control: breaking has no symmetry check
    assert ("breaking-adamw", "refactorized") not in gaps

    for name in ("small_task-curves.png", "small_task-steps.png", "small_task-invariance.png"):
        assert (tmp_path / name).stat().st_size > 0
    markdown = (tmp_path / "small_task.md").read_text()
    assert markdown.startswith("Command: `python")
    assert "## Reduction against breaking" in markdown
    for method in expected - skipped:
        assert f"| {method} |" in markdown

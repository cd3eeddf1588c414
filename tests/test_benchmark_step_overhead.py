"""Smoke test of ``benchmarks/step_overhead.py`` at toy shapes: it runs from the command line with
``--skip Muon``, reports every optimizer it times with its targets, and its floor and memory
columns mean what the docs say: the floor is the reference plus the check plus the counted passes
(so at least the reference), and the work buffers are the full-size temporaries each quotient
optimizer keeps (2 or 3 tensors shaped like the heads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from quotientopt.optim import QuotientHamiltonian

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "step_overhead.py"
TOY = ["--layers", "1", "--heads", "2", "--width", "32", "--head-dim", "8", "--vocab", "64"]
OPTIONS = ["--rounds", "2", "--warmup", "1", "--skip", "Muon"]


def test_toy_run_reports_rows_targets_floors_and_work_buffers(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TOY, *OPTIONS, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "step_overhead-cpu.json").read_text())
    rows = {row["optimizer"]: row for row in report["results"]}
    assert not any("Muon" in name for name in rows)  # --skip
    for name in ("QuotientSGD momentum", "QuotientAdam (rest: fused AdamW)", "QuotientHamiltonian"):
        assert name in rows and rows[name]["median_ms"] > 0
    assert {check["optimizer"] for check in report["targets"]} >= {
        "QuotientSGD momentum",
        "QuotientAdam (rest: fused AdamW)",
        "QuotientHamiltonian",
    }

    # the floor: reference + non-finite check + passes x one pass, never below the reference
    parts = report["floor_parts_ms"]
    one_pass = min(parts["product"], parts["gram"])
    for floor in report["floors"]:
        reference_ms = rows[floor["reference"]]["median_ms"]
        expected = reference_ms + parts["check"] + floor["passes"] * one_pass
        assert abs(floor["floor_ms"] - expected) <= 1e-6 * expected
        assert floor["floor_ratio"] >= 1.0

    # work buffers: heads are 2 sectors of (layers, heads, 2 * width, head_dim) float32
    head_mib = 2 * (1 * 2 * 2 * 32 * 8) * 4 / 2**20
    assert abs(rows["QuotientSGD momentum"]["work_mib"] - 2 * head_mib) < 1e-9  # gradient, point
    assert abs(rows["QuotientAdam (rest: fused AdamW)"]["work_mib"] - 3 * head_mib) < 1e-9
    # point, spare momentum, one velocity per factor (half a head tensor each) and, with the
    # diagnostics on (frictionless), the float32 scratch of the plain tensors' kinetic energy
    scratch_mib = QuotientHamiltonian.kinetic_chunk * 4 / 2**20
    assert abs(rows["QuotientHamiltonian"]["work_mib"] - 3 * head_mib - scratch_mib) < 1e-9
    assert abs(rows["QuotientHamiltonian, diagnostics=False"]["work_mib"] - 3 * head_mib) < 1e-9
    assert rows["torch SGD-momentum (fused)"]["work_mib"] == 0
    markdown = (tmp_path / "step_overhead-cpu.md").read_text()
    assert "| optimizer | full-size passes | floor (ms)" in markdown

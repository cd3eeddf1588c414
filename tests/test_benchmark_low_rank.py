"""Smoke test of ``benchmarks/low_rank.py --quick``: it runs from the command line, writes the
JSON and markdown reports, lists every method, and QuotientSGD recovers the ill-conditioned target
with the step size tuned on kappa = 1 while Euclidean gradient descent on the factors does not."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import quotientopt.optim

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "low_rank.py"
METHODS = {
    "QuotientSGD",
    "QuotientHamiltonian",
    "QuotientAdam",
    "geoopt RiemannianSGD",
    "geoopt RiemannianAdam",
    "torch SGD (A, B)",
    "torch Adam (A, B)",
    "pymanopt SteepestDescent",
    "pymanopt ConjugateGradient",
    "pymanopt TrustRegions",
}


def test_quick_run_reports_every_method_and_quotient_sgd_converges(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--tune-on",
            "smallest",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "low_rank.json").read_text())
    markdown = (tmp_path / "low_rank.md").read_text()
    assert data["command"].startswith("python ") and "--quick" in data["command"]
    assert data["environment"]["torch_threads"] == 1

    # every method is listed; only QuotientAdam may be skipped, and only if it cannot be imported
    assert {m["name"] for m in data["methods"]} == METHODS
    assert all(len(m["grid"]) in (1, 4) for m in data["methods"])
    has_adam = (
        hasattr(quotientopt.optim, "QuotientAdam")
        or importlib.util.find_spec("quotientopt.optim.adam") is not None
    )
    assert set(data["skipped"]) == (set() if has_adam else {"QuotientAdam"})
    ran = METHODS - set(data["skipped"])
    results = {(r["problem"], r["kappa"], r["method"]): r for r in data["results"]}
    assert len(results) == len(data["results"])  # one result per (problem, kappa, method)
    assert set(results) == {
        (problem, kappa, method)
        for problem in ("sensing", "completion")
        for kappa in data["kappas"]
        for method in ran
    }
    for name in ran:
        assert f"| {name} |" in markdown
    assert ("QuotientAdam skipped" in proc.stdout) == (not has_adam)

    # the point of the benchmark: the quotient step size tuned on kappa = 1 works at kappa = 100
    assert data["kappas"] == [1.0, 100.0]
    for kappa in (1.0, 100.0):
        run = results[("sensing", kappa, "QuotientSGD")]
        assert run["status"] == "reached", run
        assert run["error"] <= data["tolerance"] == 1e-6
        assert 0 < run["iterations"] <= data["budgets"]["first_order"]
        assert run["seconds"] > 0
    # ... and Euclidean gradient descent on the same factors, same tuning, does not
    assert results[("sensing", 1.0, "torch SGD (A, B)")]["status"] == "reached"
    assert results[("sensing", 100.0, "torch SGD (A, B)")]["status"] != "reached"

"""Smoke tests: every example runs and shows what it claims."""

from __future__ import annotations

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_declare_heads_trains():
    result = load("declare_heads.py")["main"](steps=60)
    assert result["last_loss"] < 0.5 * result["first_loss"]


def test_refactorization_invariance_example():
    gaps = load("refactorization_invariance.py")["main"](steps=100)
    assert gaps["QuotientSGD"] < 1e-10
    assert gaps["torch.optim.SGD"] > 1e-4

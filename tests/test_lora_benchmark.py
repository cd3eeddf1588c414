"""benchmarks/lora.py end to end on its tiny stand-in model (seconds): the json and markdown are
written, --resume skips finished runs, and the invariance column separates the contenders."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_lora_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    lora = importlib.import_module("lora")
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40)
    argv = [
        "--model",
        "tiny",
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--ranks",
        "2",
        "--contenders",
        "adamw",
        "quotient-adam",
        "--grid-factors",
        "1",
        "3",
        "--final-seeds",
        "1",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--batch",
        "2",
        "--seq",
        "16",
        "--eval-windows",
        "2",
    ]
    table = lora.main(argv)
    rows = table[2]
    assert set(rows) == {"adamw", "quotient-adam"}
    for row in rows.values():
        assert row["seeds"] == 1 and len(row["tune"]) == 2
    # PEFT's B = 0 start re-factorized by a cond-1000 G: float32 rounding for the quotient
    # optimizer, order one for AdamW
    assert rows["quotient-adam"]["invariance"] < 1e-3
    assert rows["adamw"]["invariance"] > 1e-2
    saved = json.loads((tmp_path / "out" / "lora.json").read_text())
    assert len(saved["results"]) == 2 * (2 + 1 + 1)
    assert "| quotient-adam |" in (tmp_path / "out" / "lora.md").read_text()

    def no_run(*args, **kwargs):
        raise AssertionError("--resume ran a finished run again")

    monkeypatch.setattr(lora, "train_run", no_run)
    lora.main([*argv, "--resume"])
    sys.modules.pop("lora", None)

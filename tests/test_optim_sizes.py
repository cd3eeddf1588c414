"""Issue 27: the optimizer layer stays readable: no function in ``quotientopt/optim/`` over 50
lines and no file there over 450 lines."""

from __future__ import annotations

import ast
from pathlib import Path

OPTIM = Path(__file__).resolve().parents[1] / "quotientopt" / "optim"


def test_no_optim_file_over_450_lines():
    long = {f.name: n for f in OPTIM.glob("*.py") if (n := len(f.read_text().splitlines())) > 450}
    assert not long, f"files over 450 lines: {long}"


def test_no_optim_function_over_50_lines():
    long = {}
    for f in OPTIM.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 50:
                    long[f"{f.name}:{node.name}"] = lines
    assert not long, f"functions over 50 lines: {long}"

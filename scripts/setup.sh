#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: the CPU build of torch 2.13.0,
# then quotientopt itself in editable mode with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
# torch first and pinned: this spec takes the CPU wheel these machines carry, never a CUDA build.
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"

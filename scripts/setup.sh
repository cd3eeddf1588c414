#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv: torch 2.13.0, then quotientopt
# itself in editable mode with its test extra (which holds the plots, pymanopt and docs extras).
# Idempotent.
#
# Which torch build pip picks depends on the package index: on the development machines the local
# CPU wheel, from PyPI on Linux the CUDA build (plus ~15 nvidia-* packages). For the CPU build set
# TORCH_INDEX_URL to an index that serves it, e.g.
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first and pinned, so the package install below keeps it
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${pip[@]}" "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
else
    "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[test]"

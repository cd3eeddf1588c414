#!/usr/bin/env bash
# Set up .venv, lint, and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check quotientopt tests benchmarks examples
.venv/bin/ruff format --check quotientopt tests benchmarks examples
exec .venv/bin/python -m pytest "$@"

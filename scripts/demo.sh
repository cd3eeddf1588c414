#!/usr/bin/env bash
# Set up .venv and run the main job on its embedded default (extra arguments go to the command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/quotientopt demo "$@"

#!/usr/bin/env bash
# Set up .venv and run the main job, `quotientopt compare`, on its embedded default corpus
# (extra arguments go to the command, e.g. --data PATH --steps 300).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/quotientopt compare "$@"

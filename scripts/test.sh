#!/usr/bin/env bash
# Set up .venv, lint, and run the whole test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check quotientopt tests benchmarks examples docs/_ext
.venv/bin/ruff format --check quotientopt tests benchmarks examples docs/_ext
# The documentation site must build without a warning (--strict), into a temporary folder, not
# ./site. Its log is shown only on failure: --quiet would also hide the warnings from --strict's
# count (mkdocs 1.6), so a broken link would pass.
site_dir=$(mktemp -d)
if ! NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir "$site_dir/site" >"$site_dir/log" 2>&1; then
    cat "$site_dir/log" >&2
    rm -rf "$site_dir"
    echo "mkdocs build --strict failed (log above)" >&2
    exit 1
fi
rm -rf "$site_dir"
exec .venv/bin/python -m pytest "$@"

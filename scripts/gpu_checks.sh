#!/usr/bin/env bash
# The GPU checks of issues 13 and 14, in one command for the workplace's `device` tool (a session
# lent a GPU has 15 minutes of device time in all, a machine's start included: run this once,
# with timeout_s ~450, which leaves the 4 minutes a second start needs).
#
# The device image has CUDA torch but no geoopt and no package index. Prepare here, once:
#     echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: -d .whl geoopt==0.5.1
# then run there (carry [".whl"]):
#     bash scripts/gpu_checks.sh
# Everything it prints also goes to $OUT/gpu_checks.log; the benchmarks' tables to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_checks}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site" || exit 1
fi
nvidia-smi -L || true
status=0
"$PY" -c "import torch, geoopt; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'geoopt', geoopt.__version__)" \
    || exit 1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, report, go on
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) ==="
    local start=$SECONDS
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s ==="
    [ "$rc" -eq 0 ] || status=1
}
# CUDA variants of the device tests (CPU ones too; nothing is skipped)
step test_devices 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_devices.py
# issue 14: every optimizer against torch's fused SGD / AdamW at GPT-2-small shapes
step step_overhead 180 "$PY" benchmarks/step_overhead.py --device cuda --rounds 8 --warmup 4 \
    --skip Muon --out "$OUT"
# issue 13: torch Muon vs QuotientMuon (both head norms) on the attention and on the whole block
step step_overhead_muon 120 "$PY" benchmarks/step_overhead.py --device cuda --rounds 8 \
    --warmup 4 --only Muon --out "$OUT/muon"
exit $status

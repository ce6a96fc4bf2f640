#!/usr/bin/env bash
# The GPU check of issue 12, in one go: ~6 min on one H200 (budget 8), ~2 min with --dry-run on a CPU.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (torch 2.11 there; no network)
#   bash benchmarks/gpu_check.sh --dry-run   # here: the same script on CPU, tiny shapes, injected OOM
#
# The GPU machine lacks structlog (the worker logs with it): benchmarks/gpu_wheels.sh puts its
# wheel in .whl/ (git-ignored through .git/info/exclude); name `.whl` in the run's `carry`.
# Output: the summary on stdout, JSON and the full log in $OUT (or bench-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed" >&2; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--dry-run" && -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; fi
OUTDIR=${OUT:-bench-out}
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
# 470 s: the whole check must end inside 8 minutes, leaving time to copy the results back.
timeout 470 "$PY" benchmarks/gpu_check.py --out "$OUTDIR/gpu_check.json" "$@" 2>&1 | tee "$OUTDIR/gpu_check.log"
rc=${PIPESTATUS[0]}
[[ $rc == 124 ]] && echo "gpu_check: stopped at its 470 s budget; partial figures in $OUTDIR/gpu_check.json" >&2
exit "$rc"

#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks for benchmarks/gpu_check.sh into .whl/ (Python 3.12
# there), and keep .whl/ out of git through this checkout's info/exclude. Run once, here.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
mkdir -p .whl
# structlog: trainerd's logging (the worker imports it). Pure Python, no dependencies on 3.12.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .whl "structlog==${STRUCTLOG_VERSION:-26.1.0}"
# bitsandbytes: the nf4 (QLoRA) layout of issue 19's check. Its manylinux wheel carries the CUDA
# kernels (41 MiB of the 64 MiB a run may carry: drop it to run the other parts alone).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl "bitsandbytes==${BITSANDBYTES_VERSION:-0.50.2}" \
    || echo "bitsandbytes: no wheel fetched; gpu_check skips its QLoRA part" >&2
ls -l .whl

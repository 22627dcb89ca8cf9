#!/usr/bin/env bash
# GPU check (see scripts/gpu_check.py): torch on CUDA for every stage that does not need TensorRT,
# one table at the end. Falls back to the CPU, and says so, where no GPU is visible.
#   bash scripts/gpu_check.sh                 # real embedded MiniLM, smoke sizes (< 8 min on an H100)
#   bash scripts/gpu_check.sh --random-init   # tiny random model (CI)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" scripts/gpu_check.py "$@"

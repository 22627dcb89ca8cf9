#!/usr/bin/env bash
# GPU acceptance check (see scripts/gpu_check.py for the rows): torch on CUDA for every training stage, ONNX
# Runtime's CUDA provider, and, where TensorRT is importable, engine=tensorrt plans (INT8, FP8 from compute
# capability 8.9) built, inspected, compared, shape-checked, rebuilt with a foreign timing cache and timed with CUDA
# events. One table at the end; exit 1 on any FAIL. Under 8 minutes on one H100.
# Writes <out>/gpu_check.json (rows + measured data + probe) and <out>/gpu_check.log (stdout + stderr).
#   bash scripts/gpu_check.sh                                      # real embedded MiniLM, smoke sizes
#   bash scripts/gpu_check.sh --require-cuda --require-tensorrt    # the GPU acceptance run
#   bash scripts/gpu_check.sh --random-init                        # tiny random model (CI; the CPU fallback)
#   bash scripts/gpu_check.sh --out outputs/gpu_check/h100 --only probe,cuda
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

out=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
  esac
done
if [ -z "$out" ]; then
  out="outputs/gpu_check/$(date +%Y-%m-%d_%H-%M-%S)"
  args+=(--out "$out")
fi
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"

# stdout and stderr each go to the terminal (stdout stays the table's stream) and both into the log; TensorRT's own
# log, written by C++ to file descriptor 2, is captured too.
PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py "${args[@]}" > >(tee -a "$log") 2> >(tee -a "$log" >&2)
rc=$?
wait
exit "$rc"

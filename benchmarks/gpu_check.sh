#!/usr/bin/env bash
# `make gpu-check`: everything a GPU session owes, in one call on one H100/H200, under 9 minutes all told:
#   1. the GPU tests (tests/test_gpu.py)                                                             70 s at most
#   2. make bench-gpu: decode paths, PyNvVideoCodec, the image row, the best loader feeding a ViT-L/16 step  190 s
#   3. make bench-train: ViT-B/L/H eager (batch 24), each with its largest batch (a bounded search)  150 s
#   4. make bench-train: ViT-L compiled                                                             120 s
# Each step runs under its own timeout and writes into OUT as it measures (versions.txt first, then each step's
# log and rows); a step that fails or times out is marked in OUT/steps.tsv and the next one runs.
#
#   OUT=DIR [PY=python3] bash benchmarks/gpu_check.sh          # on the GPU host: make gpu-check SETUP= OUT=DIR
#   OUT=DIR bash benchmarks/gpu_check.sh smoke                 # the same steps on the CPU, tiny (make test runs it)
#
# On a GPU host reached through the device tool: PYTHONPATH=/tmp/site:$PWD (the DALI bundle, DEVELOPERS.md).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
PY=${PY:-$(command -v python3 || command -v python)}
CACHE=${CACHE:-data/bench/gpu}
MODE=${1:-gpu}
mkdir -p "$OUT"
: > "$OUT/steps.tsv"
failed=0

step() {  # step NAME SECONDS COMMAND...: its output in OUT/NAME.txt, its outcome in OUT/steps.tsv
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 25 "$OUT/$name.txt"
  local what=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what=timeout; elif [ "$rc" -ne 0 ]; then what="failed (exit $rc)"; fi
  [ "$what" = ok ] || failed=1
  printf '%s\t%s\t%d s\n' "$name" "$what" $((SECONDS - t0)) | tee -a "$OUT/steps.tsv"
}

# 0. what the numbers were measured on, before anything can fail
{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" - <<'EOF'
import importlib, platform, os
import torch
print("python", platform.python_version(), "| cores", os.cpu_count())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| GPUs", torch.cuda.device_count(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for mod in ("nvidia.dali", "PyNvVideoCodec", "av"):
    try:
        print(mod, importlib.import_module(mod).__version__)
    except Exception as e:
        print(mod, "not available:", type(e).__name__, e)
EOF
} > "$OUT/versions.txt" 2>&1
cat "$OUT/versions.txt"

if [ "$MODE" = smoke ]; then
  tiny=(img=32 frames=4 steps=1 warmup=1 "train=[device=cpu,model.predictor_depth=2,model.predictor_width=96,model.predictor_heads=4]")
  step tests 300 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  step bench-gpu 600 "$PY" -m benchmarks.bench_gpu smoke=true out="$OUT/bench-gpu" cache="$CACHE" batches=2 train_steps=2
  step bench-train 300 "$PY" -m benchmarks.bench_train sizes=[tiny] batch=2 "${tiny[@]}" max_batch=true \
    max_batch_limit=4 max_batch_tries=3 --json "$OUT/bench-train.json"
else
  step tests 70 "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider
  step bench-gpu 190 "$PY" -m benchmarks.bench_gpu out="$OUT/bench-gpu" cache="$CACHE"
  step bench-train 150 "$PY" -m benchmarks.bench_train amp=bf16 sizes=[base,large,huge] batch=24 steps=10 warmup=3 \
    max_batch=true max_batch_tries=5 --json "$OUT/bench-train.json"
  step bench-train-compiled 120 "$PY" -m benchmarks.bench_train amp=bf16 sizes=[large] batch=24 steps=10 warmup=2 \
    "train=[compile=true]" --json "$OUT/bench-train-compiled.json"
fi
echo "== steps"
cat "$OUT/steps.tsv"
exit $failed

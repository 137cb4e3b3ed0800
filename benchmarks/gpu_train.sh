#!/usr/bin/env bash
# The training-step measurements a GPU session owes (BENCHMARKS.md, "make bench-train"), in one call of about
# 8 minutes on one H100/H200. Needs torch and this repository's Python dependencies, not DALI.
#   OUT=/tmp/out bash benchmarks/gpu_train.sh        (writes OUT/*.json and OUT/*.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench-gpu}
PY=${PY:-python}
mkdir -p "$OUT"
bench() {  # name, then bench_train's arguments
  local name=$1; shift
  echo "== $name: $*"
  timeout 300 "$PY" -m benchmarks.bench_train amp=bf16 "$@" --json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.txt" \
    || echo "== $name failed (exit ${PIPESTATUS[0]})"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"
# 1. the issue's target: ViT-L/16 at batch 24 (>= 45% MFU), with ViT-B and ViT-H beside it; eager, then compiled
bench eager sizes=[base,large,huge] batch=24 steps=15 warmup=3
bench compiled sizes=[large] batch=24 steps=15 warmup=3 "train=[compile=true]"
# 2. memory: the largest batch per GPU, with activation checkpointing (ViT-g needs it) and without (ViT-L)
bench maxbatch_ac sizes=[large,huge,giant] batch=16 steps=2 warmup=1 max_batch=true \
  "train=[model.activation_checkpointing=true]"
bench maxbatch sizes=[large] batch=16 steps=2 warmup=1 max_batch=true

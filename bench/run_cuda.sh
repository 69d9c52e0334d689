#!/usr/bin/env bash
# The GPU benchmark in one run: the sample scenes captioned on CUDA, then `bench/compare.py`
# (caption-bench against transformers on the same full-size random weights, made on the machine)
# in fp32, bf16 and fp16. About 6 minutes on an H200.
# Usage: bench/run_cuda.sh BIN_DIR OUT_DIR   (BIN_DIR holds caption-cascade and caption-bench,
# release builds against a CUDA libtorch; strip them to carry them: about 18 MB each)
set -uo pipefail
BIN=${1:-target/release}
OUT=${2:-bench/out}
mkdir -p "$OUT"
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN/caption-cascade" caption --device cuda examples/images/*.png
"$BIN/caption-cascade" caption --device cuda --dtype bf16 examples/images/*.png
for dtype in fp32 bf16 fp16; do
  python3 bench/compare.py --device cuda --dtype "$dtype" --threads 16 --hf-batch 32 --concurrency 1,32,64 \
    --seconds 15 --rounds 1 --bin "$BIN/caption-bench" --bench-args "--generate-max-batch 64 --max-queue-size 1024" \
    --models-dir "${BENCH_MODELS:-/tmp/bench-models}" --out "$OUT/cuda-$dtype.json" | tee "$OUT/cuda-$dtype.md"
done

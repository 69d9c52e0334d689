#!/usr/bin/env bash
# The CUDA benchmark run: the embedded models and full-size BLIP-base / CLIP ViT-B/32 (random
# weights) against concurrency 1…32, plus a cascade call on the sample scenes.
# Usage: bench/run_cuda.sh BIN_DIR OUT_DIR   (BIN_DIR holds caption-cascade and caption-bench)
set -uo pipefail
BIN=${1:-target/debug}
OUT=${2:-bench/out}
mkdir -p "$OUT"
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH/lib:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN/caption-cascade" caption --device cuda examples/images/*.png
"$BIN/caption-bench" --device cuda --models embedded --seconds 5 --generate-max-batch 32 --json "$OUT/cuda-embedded.jsonl"
"$BIN/caption-bench" --device cuda --models base --seconds 8 --generate-max-batch 32 --json "$OUT/cuda-base.jsonl"
"$BIN/caption-bench" --device cuda --models base --seconds 8 --concurrency 8,16,32 --generate-max-batch 32 --executors 2 --json "$OUT/cuda-base-2-executors.jsonl"

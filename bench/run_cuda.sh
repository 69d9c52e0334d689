#!/usr/bin/env bash
# The GPU benchmark in one run: the sample scenes captioned on CUDA, then `bench/compare.py`
# (caption-bench against transformers on the same full-size random weights, made on the machine)
# in fp32, bf16 and fp16, and caption-bench again in bf16 with --cuda-graphs. Before that, the
# sample scenes' greedy captions on the GPU must equal the CPU's (fp32) and, with --cuda-graphs,
# the GPU's without. About 8 minutes on an H200.
# Usage: bench/run_cuda.sh BIN_DIR OUT_DIR   (BIN_DIR holds caption-cascade and caption-bench,
# release builds against a CUDA libtorch; strip them to carry them: about 18 MB each)
set -uo pipefail
BIN=${1:-target/release}
OUT=${2:-bench/out}
mkdir -p "$OUT"
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')
export LD_LIBRARY_PATH="$TORCH/lib:${LD_LIBRARY_PATH:-}"
# Prints whether two `caption --json` outputs hold the same candidates for the same images.
same() {
  python3 - "$@" <<'PY'
import json, sys
what, *files = sys.argv[1:]
a, b = (sorted((j["image"], j.get("candidates")) for j in map(json.loads, open(f))) for f in files)
ok = a == b and len(a) > 0
print(f"{what}: {'the same' if ok else 'DIFFERENT'} greedy captions on {len(a)} images")
if not ok:
    print(a, "\n", b)
PY
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$BIN/caption-cascade" caption --device cuda examples/images/*.png
"$BIN/caption-cascade" caption --device cuda --dtype bf16 examples/images/*.png
# The GPU paths against the CPU: fp32 greedy captions on both must be the same.
"$BIN/caption-cascade" caption --device cpu --greedy --json examples/images/*.png >"$OUT/cpu-fp32.jsonl"
for dtype in fp32 bf16; do
  "$BIN/caption-cascade" caption --device cuda --dtype $dtype --greedy --json examples/images/*.png >"$OUT/eager-$dtype.jsonl"
  "$BIN/caption-cascade" caption --device cuda --dtype $dtype --greedy --json --cuda-graphs examples/images/*.png \
    >"$OUT/graphs-$dtype.jsonl"
  same "cuda $dtype with --cuda-graphs" "$OUT/eager-$dtype.jsonl" "$OUT/graphs-$dtype.jsonl"
done
same "cuda fp32 against cpu fp32" "$OUT/cpu-fp32.jsonl" "$OUT/eager-fp32.jsonl"
for dtype in fp32 bf16 fp16; do
  python3 bench/compare.py --device cuda --dtype "$dtype" --threads 16 --hf-batch 32 --concurrency 1,32,64 \
    --seconds 15 --rounds 1 --bin "$BIN/caption-bench" --bench-args "--generate-max-batch 64 --max-queue-size 1024" \
    --models-dir "${BENCH_MODELS:-/tmp/bench-models}" --out "$OUT/cuda-$dtype.json" | tee "$OUT/cuda-$dtype.md"
done
# The same bf16 load with the decode steps' pieces replayed from CUDA graphs (the models compare.py
# made above).
"$BIN/caption-bench" --models checkpoints --blip-model "${BENCH_MODELS:-/tmp/bench-models}/blip-base" \
  --clip-model "${BENCH_MODELS:-/tmp/bench-models}/clip-vit-base-patch32" --device cuda --dtype bf16 --cuda-graphs \
  --intra-op-threads 16 --concurrency 1,32,64 --seconds 15 --generate-max-batch 64 --max-queue-size 1024 \
  --json "$OUT/cuda-bf16-graphs.jsonl" | tee "$OUT/cuda-bf16-graphs.md"

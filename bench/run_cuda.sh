#!/usr/bin/env bash
# The GPU run, in two parts that each fit one device command and bring back two files:
# OUT_DIR/cuda-PART.tar.gz (every output, log and GPU memory trace) and OUT_DIR/cuda-PART.txt (the
# summary: each check's PASS or FAIL, then the tables).
#
#   preflight (about 3 minutes): correctness first. The sample scenes' greedy captions on the GPU
#     (fp32 and bf16, each eager, --cuda-graphs=pieces and --cuda-graphs=whole) against the CPU's
#     fp32 and the GPU's eager ones; the first decode step's logits on the GPU (fp32, bf16) against
#     the CPU's fp32 within the tolerances bench/compare.py states; then one short bf16 load of
#     full-size models eager, with pieces and whole steps graphed, and a server (whole steps)
#     with metrics on so the decode steps' batch sizes (images per step; rows are images x
#     candidates) are logged, and GPU memory sampled throughout.
#   full (at most 8 minutes): bench/compare.py, caption-bench against transformers on the same
#     full-size weights, in bf16 and fp16, then caption-bench in bf16 with --cuda-graphs=pieces
#     and with --cuda-graphs=whole, and each against the targets (700 images/s, 5x transformers
#     batched in bf16).
#   Each caption-bench load also reports where its decode steps' time went: host time per step
#   against the time spent waiting for the device's results.
#
# Any failed request, error record, run without candidates, different caption or logit beyond
# its tolerance makes the part FAIL (exit 1); a step over its time limit fails too. Offline: only
# the carried files are read (HF_HUB_OFFLINE=1).
#
# Usage: bench/run_cuda.sh preflight|full BIN_DIR OUT_DIR
#   BIN_DIR holds caption-cascade and caption-bench, release builds against a CUDA libtorch
#   (strip them to carry them: about 18 MB each). Needs python3 with torch (and, for `full`,
#   transformers and Pillow).
set -uo pipefail
PART=${1:?usage: bench/run_cuda.sh preflight|full BIN_DIR OUT_DIR}
BIN=${2:-target/release}
OUT=${3:-bench/out}
case "$PART" in preflight | full) ;; *) echo "unknown part $PART" >&2; exit 2 ;; esac
mkdir -p "$OUT"
WORK=$(mktemp -d)
SUMMARY="$OUT/cuda-$PART.txt"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
TORCH=$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))') || exit 1
export LD_LIBRARY_PATH="$TORCH/lib:${LD_LIBRARY_PATH:-}"
MODELS=${BENCH_MODELS:-/tmp/bench-models}
# BENCH_DEVICE=cpu dry-runs the script's flow without a GPU (the --cuda-graphs steps then fail).
# The graph modes a run compares: none, the pieces between attentions, the whole step.
graph_flags() { case $1 in eager) ;; pieces) echo --cuda-graphs=pieces ;; whole) echo --cuda-graphs=whole ;; esac; }
DEV=${BENCH_DEVICE:-cuda}
# 48 images x 10 candidates = 480 rows per decode step at most: within the largest CUDA graph
# bucket (512 rows), so the graphed runs replay at every level (--cuda-graphs refuses more).
LOAD="--generate-max-batch 48 --max-candidates 10 --max-queue-size 1024"
failed=0

note() { echo "$*" | tee -a "$SUMMARY"; }
# Runs a step under a time limit, its stdout in WORK/NAME.out and stderr in WORK/NAME.log; a
# failure or timeout fails the part.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.out" 2>"$WORK/$name.log"
  local rc=$?
  if [ $rc -ne 0 ]; then
    failed=1
    note "FAIL $name: exit $rc after $((SECONDS - t0)) s (limit $limit s); last lines:"
    tail -n 5 "$WORK/$name.log" "$WORK/$name.out" | tee -a "$SUMMARY"
  else
    echo "# $name: $((SECONDS - t0)) s" >>"$SUMMARY"
  fi
  return $rc
}
check() {
  python3 bench/compare.py check "$@" | tee -a "$SUMMARY"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed=1
}
# Where a decode step's time goes, per level of a caption-bench JSON file: host time (launches,
# bookkeeping) against the time the host waited for the device to read results back.
step_times() {
  python3 - "$1" "$2" <<'PY' | tee -a "$SUMMARY"
import json, sys
fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
for line in open(sys.argv[2]):
    if line.strip():
        r = json.loads(line)
        print(f"# {sys.argv[1]}, concurrency {r['concurrency']}: {r.get('decode_steps', 0)} decode steps "
              f"({r.get('whole_steps', 0)} whole), "
              f"host {fmt(r.get('host_ms_per_step'))} ms/step, device wait {fmt(r.get('device_wait_ms_per_step'))} ms/step")
PY
}
finish() {
  [ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
  note "$([ $failed -eq 0 ] && echo PASS || echo FAIL) $PART"
  cp "$SUMMARY" "$WORK/"
  tar czf "$OUT/cuda-$PART.tar.gz" -C "$WORK" .
  exit $failed
}

: >"$SUMMARY"
note "# bench/run_cuda.sh $PART, $(date -u +%FT%TZ), $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
python3 -c 'import torch, sys; print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}")' | tee -a "$SUMMARY"
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -lms 500 >"$WORK/gpu-memory.csv" 2>&1 &
SMI=$!

if [ "$PART" = preflight ]; then
  caption=("$BIN/caption-cascade" caption --greedy --json examples/images/*.png)
  step cpu-fp32 60 "${caption[@]}" --device cpu --dtype fp32
  for dtype in fp32 bf16; do
    for mode in eager pieces whole; do
      step "$mode-$dtype" 60 "${caption[@]}" --device $DEV --dtype $dtype $(graph_flags $mode)
    done
    for mode in pieces whole; do
      check captions "$DEV $dtype, --cuda-graphs=$mode against eager" "$WORK/eager-$dtype.out" "$WORK/$mode-$dtype.out"
    done
  done
  check captions "$DEV fp32 against cpu fp32" "$WORK/cpu-fp32.out" "$WORK/eager-fp32.out"
  check captions "$DEV bf16 against cpu fp32" "$WORK/cpu-fp32.out" "$WORK/eager-bf16.out"
  step logits-cpu-fp32 60 "$BIN/caption-bench" --device cpu --dtype fp32 --first-step-logits "$WORK/logits-cpu-fp32.json"
  for dtype in fp32 bf16; do
    step logits-$DEV-$dtype 60 "$BIN/caption-bench" --device $DEV --dtype $dtype \
      --first-step-logits "$WORK/logits-$DEV-$dtype.json"
    check logits "first-step logits, $DEV $dtype against cpu fp32" "$WORK/logits-cpu-fp32.json" \
      "$WORK/logits-$DEV-$dtype.json" $dtype
  done
  # One short bf16 load of full-size models (random weights made in memory), eager and graphed.
  for mode in eager pieces whole; do
    step "bench-bf16-$mode" 60 "$BIN/caption-bench" --models base --device $DEV --dtype bf16 $(graph_flags $mode) \
      --concurrency 48 --seconds 5 $LOAD --json "$WORK/bench-bf16-$mode.jsonl"
    check bench "full-size bf16 $mode" "$WORK/bench-bf16-$mode.jsonl"
    grep -E '^ +[0-9]' "$WORK/bench-bf16-$mode.out" | sed "s/^/# $mode: /" >>"$SUMMARY"
    step_times "full-size bf16 $mode" "$WORK/bench-bf16-$mode.jsonl"
  done
  # Images per decode step, from a server's metrics while caption-bench loads it (embedded models).
  "$BIN/caption-cascade" serve --device $DEV --dtype bf16 $([ "$DEV" = cuda ] && graph_flags whole) $LOAD --listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 --ready-file "$WORK/ready.json" >"$WORK/serve.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 60); do [ -s "$WORK/ready.json" ] && break; sleep 0.5; done
  if [ -s "$WORK/ready.json" ]; then
    grpc=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["grpc"])' "$WORK/ready.json")
    metrics=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"])' "$WORK/ready.json")
    step bench-served 40 "$BIN/caption-bench" --endpoint "$grpc" --concurrency 48 --seconds 5 \
      --json "$WORK/bench-served.jsonl"
    check bench "served, bf16 whole steps" "$WORK/bench-served.jsonl"
    python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1]).read().decode())' \
      "http://$metrics/metrics" >"$WORK/metrics.txt"
    python3 - "$WORK/metrics.txt" <<'PY' | tee -a "$SUMMARY"
import re, sys
m = dict(re.findall(r'^(caption_batch_size_(?:sum|count)\{model="generate"\}) (\S+)$', open(sys.argv[1]).read(), re.M))
s, n = (float(m.get(f'caption_batch_size_{k}{{model="generate"}}', 0)) for k in ("sum", "count"))
print(f"# decode steps: {n:.0f}, images per step {s / max(n, 1):.1f} (rows: x 10 candidates)")
PY
  else
    failed=1
    note "FAIL serve: no ready file in 30 s"
  fi
  kill "$SERVER" 2>/dev/null
  wait "$SERVER" 2>/dev/null
  note "# peak GPU memory (MiB): $(grep -oE '[0-9]+ MiB' "$WORK/gpu-memory.csv" | sort -n | tail -n 1)"
  finish
fi

# full: the table. Each compare.py run fails on any caption-bench error (see bench_failures).
for dtype in bf16 fp16; do
  step "compare-$dtype" 150 python3 bench/compare.py --device $DEV --dtype "$dtype" --threads 16 --hf-batch 32 \
    --concurrency 1,48 --seconds 10 --rounds 1 --bin "$BIN/caption-bench" --bench-args "$LOAD" \
    --models-dir "$MODELS" --out "$WORK/cuda-$dtype.json" && cat "$WORK/compare-$dtype.out" >>"$SUMMARY"
done
# The same bf16 load with graphs (the models compare.py made): the pieces, then the whole step.
for mode in pieces whole; do
  step bench-bf16-$mode 75 "$BIN/caption-bench" --models checkpoints --blip-model "$MODELS/blip-base" \
    --clip-model "$MODELS/clip-vit-base-patch32" --device $DEV --dtype bf16 $(graph_flags $mode) --intra-op-threads 16 \
    --concurrency 1,48 --seconds 8 $LOAD --json "$WORK/cuda-bf16-$mode.jsonl"
  check bench "caption-bench bf16 --cuda-graphs=$mode" "$WORK/cuda-bf16-$mode.jsonl"
  grep -E '^ +[0-9]|^#' "$WORK/bench-bf16-$mode.out" >>"$SUMMARY"
  step_times "caption-bench bf16 --cuda-graphs=$mode" "$WORK/cuda-bf16-$mode.jsonl"
done
# Each mode's best level against the targets, from the files above (all bf16, one GPU, one run).
python3 - "$WORK" <<'PY' | tee -a "$SUMMARY"
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
def best(path):
    try:
        return max(json.loads(l)["images_per_s"] for l in path.read_text().splitlines() if l.strip())
    except (OSError, ValueError):
        return None
try:
    rows = json.loads((work / "cuda-bf16.json").read_text())["rows"]
    hf = next(r["images_per_s"] for r in rows if r["side"].startswith("transformers, batch"))
    eager = max(r["images_per_s"] for r in rows if r["side"].startswith("caption-bench"))
except (OSError, ValueError, StopIteration):
    hf = eager = None
print("# targets: 700 images/s (H200; state the H100's), 5x transformers batched in bf16")
for name, ips in [("eager", eager), ("pieces", best(work / "cuda-bf16-pieces.jsonl")), ("whole", best(work / "cuda-bf16-whole.jsonl"))]:
    ratio = f"{ips / hf:.2f}x transformers" if ips and hf else "n/a"
    print(f"# bf16 {name}: {'n/a' if ips is None else f'{ips:.1f}'} images/s, {ratio}")
PY
finish

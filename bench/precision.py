#!/usr/bin/env python3
"""How far reduced precision moves the served results: the embedded models' 500 evaluation scenes
(the scenes `tools/train_shapes.py --eval-only` scores, same seed) captioned greedily and ranked by
servers started with each --dtype (or `int8`: fp32 with --quantize int8), compared with fp32.

Prints, per dtype: greedy captions identical to fp32's, greedy captions equal to the truth, CLIP
top-1 (the truth ranked strictly first among it and 9 captions of other scenes, as the training
evaluation does) and the largest CLIP logit difference from fp32. Needs `make bench`'s venv
(transformers' pins, for the scene generator's imports) and a release build of caption-cascade.

    .venv/bin/python bench/precision.py [--dtypes bf16,fp16,int8]
"""

import argparse
import concurrent.futures
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests/clients"))

import scenes  # noqa: E402
import train_shapes  # noqa: E402
from python_client import stubs  # noqa: E402


def eval_scenes():
    """The training evaluation's scenes and distractor sets, drawn in the same order."""
    rng = np.random.default_rng(train_shapes.SEED_EVAL)
    drawn = [scenes.draw_scene(rng) for _ in range(train_shapes.EVAL_SCENES)]
    truths = [d[1] for d in drawn]
    sets = []
    for _, truth, meta in drawn:
        others = []
        while len(others) < train_shapes.EVAL_DISTRACTORS:
            c = truths[rng.integers(train_shapes.EVAL_SCENES)]
            if c != truth and c not in others:
                others.append(c)
        sets.append([truth] + others)
        # Drawn only to keep the generator where the training evaluation has it.
        train_shapes.perturbations(meta, rng, train_shapes.EVAL_DISTRACTORS)
    pngs = []
    for image, _, _ in drawn:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs, truths, sets


def serve(binary, variant, ready_file):
    """The server on a port it chose, and that port, read from its ready file once it serves."""
    numerics = ["--dtype", "fp32", "--quantize", "int8"] if variant == "int8" else ["--dtype", variant]
    server = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", "--ready-file", ready_file, "--device", "cpu", *numerics],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1200):  # loading the models takes a while
        if os.path.exists(ready_file):
            with open(ready_file) as f:
                return server, int(json.load(f)["grpc"].rsplit(":", 1)[1])
        if server.poll() is not None:
            raise RuntimeError(f"{binary} serve exited with {server.returncode} before it served")
        time.sleep(0.1)
    server.terminate()
    raise RuntimeError(f"{binary} serve did not write {ready_file} within 120 s")


def run(pb, rpc, port, pngs, sets):
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=120)
    gen, rank = rpc.GeneratorStub(channel), rpc.RankerStub(channel)
    greedy = pb.GenerationParams(decoding=pb.DECODING_GREEDY, num_candidates=1,
                                 max_length=train_shapes.GENERATE_MAX_LENGTH)

    def one(i):
        image = pb.Image(data=pngs[i])
        for _ in range(600):  # the server may still be loading its models
            try:
                caption = gen.Generate(pb.GenerateRequest(image=image, params=greedy)).candidates[0].text
                break
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.1)
        ranked = rank.Rank(pb.RankRequest(image=image, captions=sets[i])).captions
        logits = [0.0] * len(sets[i])
        for r in ranked:
            logits[r.index] = r.logit
        return caption, logits

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(len(pngs))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16", help="reduced precisions to compare with fp32, comma separated (bf16, fp16, int8)")
    p.add_argument("--bin", default=str(ROOT / "target/release/caption-cascade"))
    p.add_argument("--out", help="write the figures as JSON here")
    args = p.parse_args()
    pb, rpc = stubs()
    pngs, truths, sets = eval_scenes()
    results = {}
    for dtype in ["fp32"] + args.dtypes.split(","):
        server, port = serve(args.bin, dtype, os.path.join(tempfile.mkdtemp(prefix="cc-precision-"), "ready.json"))
        try:
            t = time.perf_counter()
            results[dtype] = run(pb, rpc, port, pngs, sets)
            print(f"# {dtype}: {len(pngs)} scenes in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        finally:
            server.terminate()
            server.wait()
    base = results["fp32"]
    rows = []
    for dtype, res in results.items():
        captions = [c for c, _ in res]
        logits = np.array([l for _, l in res])
        top1 = float(np.mean([l[0] > max(l[1:]) for l in logits]))
        rows.append({
            "dtype": dtype,
            "greedy_same_as_fp32": float(np.mean([c == b for c, (b, _) in zip(captions, base)])),
            "greedy_exact_match": float(np.mean([c == t for c, t in zip(captions, truths)])),
            "clip_top1": top1,
            "clip_max_logit_diff": float(np.abs(logits - np.array([l for _, l in base])).max()),
        })
    print(f"\n# {len(pngs)} evaluation scenes of the embedded models (tools/train_shapes.py, seed {train_shapes.SEED_EVAL})\n")
    print("| dtype | greedy caption = fp32's | greedy caption = truth | CLIP top-1 (truth vs 9) | largest CLIP logit change |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {100 * r['greedy_same_as_fp32']:.1f} % | {100 * r['greedy_exact_match']:.1f} % |"
              f" {100 * r['clip_top1']:.1f} % | {r['clip_max_logit_diff']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""caption-bench against Hugging Face transformers on the same weights, in one interleaved run.

`make bench` runs this. Both sides caption the sample scenes with full-size BLIP-base and CLIP
ViT-B/32 that share one set of random weights (made once, saved under --models-dir, read by both),
N sampled candidates of a fixed length per image (min_length = max_length), then rank them with
CLIP. Rounds alternate transformers batched → caption-bench → transformers one image at a time, so
both sides see the same machine state. Prints images/s, p50/p99, peak memory, the ratio to
transformers, and the share of this machine's measured GEMM rate that the useful work reaches.

The transformers side is the origin's procedure done well: one batched generate with
num_return_sequences=N (sampling, top_p 0.9, top_k 50, repetition penalty 1.1), then one CLIPModel
call for the batch's images and candidates, a softmax per image. Image decoding and preprocessing
count on both sides.
"""

import argparse
import io
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# --- the device run's checks (`compare.py check ...`, used by bench/run_cuda.sh) ----------------
#
# Each returns a list of failures (empty: passed), so a run that produced nothing, or only errors,
# can never compare equal to another.

# Largest |difference| of first-step logits, as a share of the reference's largest |logit|.
# fp32 on CUDA against fp32 on the CPU: 1 %, because cuDNN computes fp32 convolutions (the patch
# embedding) in TF32 by default (10-bit mantissa, about 5e-4 relative per product) and GPU kernels
# sum in another order; the CPU parity suite holds 1e-4 absolute. bf16 or fp16 against fp32: 5 %,
# the bound tests/precision.rs holds on the CPU (about 2 % measured there).
LOGIT_TOL = {"fp32": 0.01, "bf16": 0.05, "fp16": 0.05}


def caption_failures(what, a_records, b_records):
    """Two `caption --json` outputs: every record a success with candidates, the same images, the
    same greedy candidates."""
    out = []
    for side, records in (("first", a_records), ("second", b_records)):
        if not records:
            out.append(f"{what}: the {side} run captioned nothing")
        for r in records:
            if "error" in r:
                out.append(f"{what}: {side} run, {r.get('image')}: error {r['error']}")
            elif not r.get("candidates"):
                out.append(f"{what}: {side} run, {r.get('image')}: no candidates")
    if out:
        return out
    a = {r["image"]: r["candidates"] for r in a_records}
    b = {r["image"]: r["candidates"] for r in b_records}
    if a.keys() != b.keys():
        return [f"{what}: different images: {sorted(a.keys() ^ b.keys())}"]
    return [f"{what}: {img}: {a[img]} != {b[img]}" for img in sorted(a) if a[img] != b[img]]


def bench_failures(what, levels):
    """caption-bench's levels (its --json lines): none may have failed requests or no requests."""
    if not levels:
        return [f"{what}: caption-bench measured no level"]
    out = []
    for lv in levels:
        c = lv.get("concurrency")
        if lv.get("errors", 0):
            out.append(f"{what}: concurrency {c}: {lv['errors']} failed requests (first: {lv.get('first_error')})")
        if not lv.get("requests"):
            out.append(f"{what}: concurrency {c}: no request answered")
    return out


def logit_failures(what, ref, got, tol):
    """Two `caption-bench --first-step-logits` outputs: the same shape, finite, within `tol` of the
    reference's largest |logit|."""
    import math

    a, b = ref.get("logits") or [], got.get("logits") or []
    if not a or [len(r) for r in a] != [len(r) for r in b]:
        return [f"{what}: logits of different shapes or none ({len(a)} rows against {len(b)})"]
    flat_a = [x for r in a for x in r]
    flat_b = [x for r in b for x in r]
    if not all(math.isfinite(x) for x in flat_a + flat_b):
        return [f"{what}: non-finite logits"]
    diff = max(abs(x - y) for x, y in zip(flat_a, flat_b))
    scale = max(abs(x) for x in flat_a)
    print(f"# {what}: largest |difference| {diff:.5f}, {100 * diff / scale:.3f} % of the largest |logit| {scale:.3f}"
          f" (tolerance {100 * tol:.1f} %)")
    return [] if diff <= tol * scale else [f"{what}: logits differ by {diff} > {tol} x {scale}"]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def check_main(argv):
    """`check captions WHAT A B` | `check bench WHAT FILE` | `check logits WHAT REF GOT DTYPE`:
    prints PASS or FAIL with the reasons, exits 1 on FAIL."""
    kind, what, *files = argv
    try:
        failures = run_check(kind, what, files)
    except (OSError, ValueError, KeyError, IndexError) as e:
        failures = [f"{what}: cannot read the results: {e!r}"]
    for f in failures:
        print(f"FAIL {f}")
    print(f"{'FAIL' if failures else 'PASS'} {what}")
    return 1 if failures else 0


def run_check(kind, what, files):
    if kind == "captions":
        failures = caption_failures(what, read_jsonl(files[0]), read_jsonl(files[1]))
    elif kind == "bench":
        failures = bench_failures(what, read_jsonl(files[0]))
    elif kind == "logits":
        ref, got = (json.loads(Path(f).read_text()) for f in files[:2])
        failures = logit_failures(what, ref, got, LOGIT_TOL[files[2]])
    else:
        failures = [f"unknown check {kind!r}"]
    return failures



def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="both sides' precision")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: both sides' linear layers int8, inputs quantized on the fly (transformers: PyTorch's"
                        " quantize_dynamic with per-channel weights, one input scale per tensor; ours: --quantize int8,"
                        " one per row); CPU, fp32")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads on both sides")
    p.add_argument("--candidates", type=int, default=10, help="candidates per image")
    p.add_argument("--decode-len", type=int, default=20, help="tokens per candidate, start token included")
    p.add_argument("--hf-batch", type=int, default=8, help="images per transformers batch")
    p.add_argument("--concurrency", default="1,8", help="caption-bench concurrency levels (the last is saturation)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--bin", default=str(ROOT / "target/release/caption-bench"), help="caption-bench binary")
    p.add_argument("--bench-args", default="", help="extra caption-bench arguments")
    p.add_argument("--models-dir", default=str(ROOT / "target/bench-models"), help="where the shared weights live")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--make-models-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args()


def torch_dtype(torch, name):
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# --- the shared weights -------------------------------------------------------------------------


def ensure_models(models_dir: Path):
    """Full-size BLIP-base and CLIP ViT-B/32 with seeded random weights, saved once as checkpoints
    both sides load. Their tokenizers are the embedded shapes models' (no model hub here): ids
    beyond them decode to nothing on both sides alike."""
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, CLIPConfig, CLIPModel

    made = []
    for name, cfg_cls, model_cls, tok_src in [
        ("blip-base", BlipConfig, BlipForConditionalGeneration, "shapes-blip"),
        ("clip-vit-base-patch32", CLIPConfig, CLIPModel, "shapes-clip"),
    ]:
        dst = models_dir / name
        if (dst / "model.safetensors").exists():
            continue
        torch.manual_seed(0)
        cfg = cfg_cls.from_pretrained(ROOT / "bench/configs" / name)
        model_cls(cfg).eval().save_pretrained(dst)
        shutil.copy(ROOT / "bench/configs" / name / "preprocessor_config.json", dst)
        for f in (ROOT / "models" / tok_src).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(f, dst)
        made.append(name)
    return made


# --- what the machine can do --------------------------------------------------------------------


def gemm_rate(torch, device, dtype, threads):
    """GFLOP/s of a [2048, 768] x [768, 3072] product (the models' MLP shape), best of a second."""
    torch.set_num_threads(threads)
    a = torch.randn(2048, 768, device=device).to(dtype)
    b = torch.randn(768, 3072, device=device).to(dtype)
    flop = 2 * 2048 * 768 * 3072
    best = float("inf")
    for _ in range(3):
        torch.mm(a, b)
    sync(torch, device)
    end = time.perf_counter() + 1.0
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        sync(torch, device)
        best = min(best, (time.perf_counter() - t) / 4)
    return flop / best / 1e9


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def flops_per_image(blip, clip, candidates, decode_len):
    """Useful FLOPs of one image: BLIP's vision tower once, cross-attention keys/values once, every
    candidate's decode steps (attending to its own history), CLIP's vision tower once and one text
    pass per candidate (taken as decode_len tokens long)."""

    def vit(v, image, patch):
        d, i, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
        p = (image // patch) ** 2
        t = p + 1
        return 2 * p * 3 * patch * patch * d + n * (8 * t * d * d + 4 * t * t * d + 4 * t * d * i)

    bv = blip["vision_config"]
    tokens = (bv["image_size"] // bv["patch_size"]) ** 2 + 1
    vision = vit(bv, bv["image_size"], bv["patch_size"])
    t = blip["text_config"]
    h, it, n, vocab = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], t["vocab_size"]
    cross_kv = n * 4 * tokens * bv["hidden_size"] * h
    decode = 0
    for past in range(decode_len - 1):
        layer = 8 * h * h + 4 * (past + 1) * h + 4 * h * h + 4 * tokens * h + 4 * h * it
        decode += n * layer + 2 * h * h + 2 * h * vocab
    decode *= candidates
    cv, ct = clip["vision_config"], clip["text_config"]
    clip_vision = vit(cv, cv["image_size"], cv["patch_size"])
    d, i, n = ct["hidden_size"], ct["intermediate_size"], ct["num_hidden_layers"]
    length = decode_len
    clip_text = candidates * n * (8 * length * d * d + 4 * length * length * d + 4 * length * d * i)
    return vision + cross_kv + decode + clip_vision + clip_text


# --- the transformers side ----------------------------------------------------------------------


class Transformers:
    def __init__(self, models_dir: Path, device, dtype, args):
        import torch
        # The PIL image processors, as the project's preprocessing mirrors: with torchvision
        # installed transformers would pick a backend that resizes differently.
        from transformers import AutoTokenizer, BlipForConditionalGeneration, CLIPModel

        try:
            from transformers import BlipImageProcessorPil, CLIPImageProcessorPil
        except ImportError:
            # A release without the backend-named classes (the GPU machines have 5.17, not the
            # pinned 5.24): its plain processors, recorded in the run's header as such.
            from transformers import BlipImageProcessor as BlipImageProcessorPil
            from transformers import CLIPImageProcessor as CLIPImageProcessorPil

            print("# transformers without BlipImageProcessorPil: its default image processors", file=sys.stderr)

        self.torch, self.device, self.dtype, self.args = torch, device, dtype, args
        blip_dir, clip_dir = models_dir / "blip-base", models_dir / "clip-vit-base-patch32"
        self.blip = BlipForConditionalGeneration.from_pretrained(blip_dir, dtype=dtype).to(device).eval()
        self.clip = CLIPModel.from_pretrained(clip_dir, dtype=dtype).to(device).eval()
        if args.quantize == "int8":
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            spec = {torch.nn.Linear: per_channel_dynamic_qconfig}
            self.blip = quantize_dynamic(self.blip, spec, dtype=torch.qint8)
            self.clip = quantize_dynamic(self.clip, spec, dtype=torch.qint8)
        self.blip_proc = BlipImageProcessorPil.from_pretrained(blip_dir)
        self.clip_proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
        self.blip_tok = AutoTokenizer.from_pretrained(blip_dir)
        self.clip_tok = AutoTokenizer.from_pretrained(clip_dir)

    def caption(self, images: list[bytes], seed: int):
        """Top 3 (caption, probability) per image, from encoded image bytes."""
        from PIL import Image

        torch, a = self.torch, self.args
        pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in images]
        with torch.inference_mode():
            torch.manual_seed(seed)
            pixels = self.blip_proc(pil, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            ids = self.blip.generate(
                pixel_values=pixels,
                do_sample=True,
                top_p=0.9,
                top_k=50,
                repetition_penalty=1.1,
                num_return_sequences=a.candidates,
                max_length=a.decode_len,
                min_length=a.decode_len,
            )
            texts = self.blip_tok.batch_decode(ids, skip_special_tokens=True)
            text = self.clip_tok(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            clip_pixels = self.clip_proc(pil, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
            logits = self.clip(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                               pixel_values=clip_pixels).logits_per_image.float()
            out = []
            for i in range(len(images)):
                probs = logits[i, i * a.candidates:(i + 1) * a.candidates].softmax(-1)
                top = probs.topk(3)
                out.append([(texts[i * a.candidates + j], p) for p, j in zip(top.values.tolist(), top.indices.tolist())])
        sync(torch, self.device)
        return out

    def run(self, images: list[bytes], batch: int, seconds: float, seed: int):
        """Images per second and per-call latencies over at least `seconds` (and two calls)."""
        latencies, done, n = [], 0, 0
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(latencies) < 2:
            chunk = [images[(n + j) % len(images)] for j in range(batch)]
            t = time.perf_counter()
            self.caption(chunk, seed + n)
            latencies.append(time.perf_counter() - t)
            n += batch
            done += batch
        return {"images_per_s": done / (time.perf_counter() - start), "latencies_s": latencies}


# --- the project's side -------------------------------------------------------------------------


def caption_bench(args, models_dir: Path, levels):
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as out:
        cmd = [
            args.bin, "--models", "embedded",
            "--blip-model", str(models_dir / "blip-base"),
            "--clip-model", str(models_dir / "clip-vit-base-patch32"),
            "--device", args.device, "--dtype", args.dtype, "--quantize", args.quantize,
            "--intra-op-threads", str(args.threads),
            "--candidates", str(args.candidates), "--decode-len", str(args.decode_len),
            "--concurrency", ",".join(map(str, levels)), "--seconds", str(args.seconds),
            "--json", out.name,
        ] + args.bench_args.split()
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
        levels = read_jsonl(out.name)
    # A throughput of the requests that succeeded is no throughput: any failure fails the run.
    failures = bench_failures(f"caption-bench {args.device} {args.dtype}", levels)
    if failures:
        sys.exit("\n".join(failures))
    return levels


# --- the report ---------------------------------------------------------------------------------


def percentile(values, p):
    values = sorted(values)
    return values[round((len(values) - 1) * p)] if values else float("nan")


def machine(device):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            isa = [f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if f" {f}" in flags]
            return f"{line.split(':', 1)[1].strip()} ({', '.join(isa)})"
    return platform.processor()


def main():
    args = parse_args()
    if args.quantize == "int8" and (args.device != "cpu" or args.dtype != "fp32"):
        sys.exit("--quantize int8 compares on the CPU in fp32 only")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    models_dir = Path(args.models_dir)
    if args.make_models_only:
        made = ensure_models(models_dir)
        if made:
            print(f"# made the shared random weights: {', '.join(made)} in {models_dir}", file=sys.stderr)
        return
    # In a child process, so that this one's peak memory is transformers serving, not the making.
    subprocess.run([sys.executable, __file__, "--make-models-only", "--models-dir", str(models_dir)], check=True)
    dtype = torch_dtype(torch, args.dtype)
    levels = [int(c) for c in args.concurrency.split(",")]
    images = [p.read_bytes() for p in sorted((ROOT / "examples/images").glob("*.[pj][np]g"))]
    blip_cfg = json.loads((models_dir / "blip-base/config.json").read_text())
    clip_cfg = json.loads((models_dir / "clip-vit-base-patch32/config.json").read_text())
    gflop = flops_per_image(blip_cfg, clip_cfg, args.candidates, args.decode_len) / 1e9

    hf = Transformers(models_dir, args.device, dtype, args)
    hf.caption(images[: args.hf_batch], 0)  # warm-up: lazy initialisation, kernel choice
    rounds = []
    for r in range(args.rounds):
        rate = gemm_rate(torch, args.device, dtype, args.threads)
        print(f"# round {r + 1}: GEMM {rate:.0f} GFLOP/s; transformers batched…", file=sys.stderr)
        batched = hf.run(images, args.hf_batch, args.seconds, 1000 * r)
        print(f"# round {r + 1}: caption-bench…", file=sys.stderr)
        ours = caption_bench(args, models_dir, levels)
        print(f"# round {r + 1}: transformers one image at a time…", file=sys.stderr)
        single = hf.run(images, 1, args.seconds, 1000 * r + 500)
        rounds.append({"gemm_gflops": rate, "hf_batched": batched, "hf_single": single, "ours": ours})

    hf_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    mean = statistics.mean
    gemm = mean(r["gemm_gflops"] for r in rounds)
    rows = []

    def row(name, ips, lat, peak_mb):
        rows.append({
            "side": name, "images_per_s": ips,
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99), "peak_mb": peak_mb,
            "roofline_pct": 100 * ips * gflop / gemm,
        })

    hf_b = mean(r["hf_batched"]["images_per_s"] for r in rounds)
    row(f"transformers, batch of {args.hf_batch}", hf_b,
        [t for r in rounds for t in r["hf_batched"]["latencies_s"]], hf_peak_mb)
    hf_s = mean(r["hf_single"]["images_per_s"] for r in rounds)
    row("transformers, one image at a time", hf_s,
        [t for r in rounds for t in r["hf_single"]["latencies_s"]], hf_peak_mb)
    for i, c in enumerate(levels):
        lv = [r["ours"][i] for r in rounds]
        row(f"caption-bench, concurrency {c}", mean(x["images_per_s"] for x in lv),
            [mean(x["p50_ms"] for x in lv) / 1e3] * 1, max(x.get("peak_rss_mb", 0) for x in lv))
        rows[-1]["p99_s"] = max(x["p99_ms"] for x in lv) / 1e3
    hf_p50 = rows[1]["p50_s"]
    print()
    numerics = args.dtype + (", int8 linear layers" if args.quantize == "int8" else "")
    print(f"# {machine(args.device)}; {args.device} {numerics}, {args.threads} threads; torch {torch.__version__},"
          f" transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"# BLIP-base + CLIP ViT-B/32 (same random weights), {args.candidates} candidates x {args.decode_len} tokens"
          f" per image; {args.rounds} interleaved rounds of {args.seconds:.0f} s")
    print(f"# useful work {gflop:.1f} GFLOP/image; measured {args.dtype} GEMM rate {gemm:.0f} GFLOP/s"
          f" (roofline {gemm / gflop:.2f} images/s)")
    print()
    print("| side | images/s | p50 s | p99 s | peak MB | vs transformers batched | p50 vs one at a time | % roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['peak_mb']:.0f} |"
              f" {r['images_per_s'] / hf_b:.2f}x | {r['p50_s'] / hf_p50:.2f}x | {r['roofline_pct']:.0f} % |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "machine": machine(args.device), "device": args.device, "dtype": args.dtype, "quantize": args.quantize,
            "threads": args.threads,
            "gflop_per_image": gflop, "gemm_gflops": gemm, "rows": rows, "rounds": rounds,
        }, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        sys.exit(check_main(sys.argv[2:]))
    main()

#!/usr/bin/env python3
"""The origin's bulk job with `caption-cascade caption --input`: one image at a time against a full
batcher, then a run killed part-way and resumed.

Draws --images distinct shapes scenes (tools/scenes.py, their own seed), serves them from a loopback
HTTP server, writes their URLs to a list and captions the list in-process with the embedded models:
`--concurrency 1`, then the default concurrency, each into its own results file. Then it starts a
third run, kills it (SIGKILL) once a third of the images are recorded, and reruns it to the end,
checking that every image ends with exactly one result. Prints images/s for both levels and their
ratio, over the captioning the CLI's summary reports and over the whole process (which includes
loading the models, a fixed second or so).

    .venv/bin/python bench/bulk.py --binary target/release/caption-cascade
"""

import argparse
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import scenes  # noqa: E402


def draw(folder: Path, count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    names = []
    for i in range(count):
        pixels, _, _ = scenes.draw_scene(rng)
        name = f"scene-{i:04d}.png"
        Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """The images from memory over HTTP/1.1 keep-alive, so the origin costs the run next to nothing."""
    files = {"/" + p.name: p.read_bytes() for p in folder.iterdir()}

    class Origin(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle on, the second waits for the
        # client's delayed ACK (40 ms per image, which would slow the one-at-a-time run alone).
        disable_nagle_algorithm = True

        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    server.daemon_threads = True
    server.handle_error = lambda *a: None  # the killed run's connections reset: expected
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def caption(binary: str, urls: Path, out: Path, concurrency: int | None, extra: list[str]) -> tuple[float, float]:
    """(the process's wall time, the captioning time its summary reports: without loading the models)."""
    cmd = [binary, "caption", "--input", str(urls), "--output", str(out), "--json", "--seed", "1"] + extra
    if concurrency is not None:
        cmd += ["--concurrency", str(concurrency)]
    start = time.perf_counter()
    run = subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    summary = re.search(r"captioned, \d+ failed in ([\d.]+) s", run.stderr)
    assert summary, f"no summary line in: {run.stderr[-500:]}"
    return wall, float(summary.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/caption-cascade")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--caption-args", default="", help="extra `caption` arguments for every run (e.g. scheduler flags)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "www").mkdir()
        names = draw(tmp / "www", args.images, args.seed)
        server, port = serve(tmp / "www")
        urls = tmp / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{n}\n" for n in names))

        extra = args.caption_args.split()
        one = caption(args.binary, urls, tmp / "one.jsonl", 1, extra)
        full = caption(args.binary, urls, tmp / "full.jsonl", None, extra)
        for name in ("one.jsonl", "full.jsonl"):
            got = records(tmp / name)
            failed = [r for r in got if "error" in r]
            assert len(got) == args.images and not failed, f"{name}: {len(got)} records, {len(failed)} failed"
        n = args.images
        print(f"{n} URLs, in-process, embedded models, {os.cpu_count()} CPUs; captioning (process wall time)")
        print(f"  --concurrency 1: {n / one[1]:6.1f} images/s  ({n / one[0]:6.1f})")
        print(f"  default        : {n / full[1]:6.1f} images/s  ({n / full[0]:6.1f})"
              f"  {one[1] / full[1]:.1f}x ({one[0] / full[0]:.1f}x)")

        # Killed part-way, then resumed: every image ends with exactly one result.
        out = tmp / "resume.jsonl"
        cmd = [args.binary, "caption", "--input", str(urls), "--output", str(out), "--json", "--seed", "1"] + extra
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while len(records(out)) < args.images // 3 and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = len(records(out))
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rest = time.perf_counter() - start
        keys = [r["image"] for r in records(out)]
        assert len(keys) == len(set(keys)) == args.images, f"{len(keys)} records, {len(set(keys))} distinct"
        print(f"  killed after {before} results, resumed: the rest in {rest:.1f} s, {len(keys)} results, none twice")
        server.shutdown()


if __name__ == "__main__":
    main()

"""The origin's Beam pipeline as a client of the Cascade service, run by tests/beam_pipeline.rs
with .venv-beam's Python (apache-beam and the installed caption-cascade-client package).

    test_pipeline.py --target HOST:PORT --limited HOST:PORT

--target is a server started with --fetch-allow 127.0.0.1/32; --limited one also started with
--max-inflight 1 and --fetch-timeout-s 30. Images come from examples/images over a local HTTP
server on 127.0.0.1. Each check raises with what it saw; the last stdout line is a JSON summary.

1. The installed package is current: its stubs are what generate.py makes from the repository's
   proto now, and its modules are the sources in clients/python (else: run `make beam-env`).
2. The client's retry policy against a scripted in-process gRPC server: RESOURCE_EXHAUSTED and
   UNAVAILABLE are retried with bounded, growing, jittered waits and bounded attempts;
   INVALID_ARGUMENT (and RESOURCE_EXHAUSTED for an oversized message) are not retried; the
   bearer token arrives as `authorization: Bearer <token>`; the model handler sends the origin's
   request (notebook preset, each candidate, top 3) and keeps batch order.
3. The same against the real server: a call refused with RESOURCE_EXHAUSTED (the one admission
   slot held by a call whose image fetch is parked) succeeds on retry; INVALID_ARGUMENT is raised
   after one attempt.
4. The server honours each_candidate (every candidate listed with its own probability, as the
   origin prints them), and the origin pipeline (python -m caption_cascade_client.origin_pipeline)
   on the DirectRunner captions the nine example images, printing exactly the origin's blocks
   with the service's answers (check_output, check_same_as_client).
"""

import argparse
import collections
import concurrent.futures
import contextlib
import filecmp
import functools
import http.server
import json
import math
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import threading
import time

import grpc

import caption_cascade_client
from caption_cascade_client import CaptionClient, RetryPolicy, pb, pb_grpc
from caption_cascade_client.beam import CascadeModelHandler

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGES = ROOT / "examples" / "images"
TOP_K = 3
# Sampling as the origin does (the notebook preset: top_p 0.9, top_k 50, repetition penalty 1.1,
# 10 candidates) with a fixed seed, so a run is repeatable. min_length is set to 0: the preset's
# 10 counts the whole token sequence, and the embedded models' true captions of scenes 1, 3, 5
# and 8 are 9 tokens long with the start token, so the preset forbids them (it was set for
# BLIP's real-photo captions). With it, 5 of 9 top captions are true on every seed; with 0, 9 of 9
# on 20 seeds tried. The check asks for 7 of 9, room for a changed sampler or model.
SEED = 7
PARAMS_OVER_PRESET = {"min_length": 0}
MIN_TRUE_TOP = 7


def fail(message):
    raise AssertionError(message)


# --- 1. the installed package ------------------------------------------------------------------

def check_installed_package():
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    import generate  # clients/python/generate.py

    installed = pathlib.Path(caption_cascade_client.__file__).parent
    if not generate.check(ROOT / "proto", installed / "_pb"):
        fail(f"the stubs in {installed / '_pb'} are not what {generate.PROTO} gives now: run `make beam-env`")
    source = ROOT / "clients" / "python" / "src" / "caption_cascade_client"
    for path in source.glob("*.py"):
        if not filecmp.cmp(path, installed / path.name, shallow=False):
            fail(f"installed {path.name} differs from {path}: run `make beam-env`")


# --- 2. retries against a scripted server -------------------------------------------------------

class ScriptedCascade(pb_grpc.CascadeServicer):
    """Answers Caption calls with the next scripted status code; OK answers echo the request."""

    def __init__(self):
        self.script = collections.deque()
        self.requests = []
        self.metadata = []
        self.lock = threading.Lock()

    def Caption(self, request, context):
        with self.lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            code, details = self.script.popleft() if self.script else (grpc.StatusCode.OK, "")
        if code != grpc.StatusCode.OK:
            context.abort(code, details)
        key = request.image.url or "sha256:fake"
        return pb.CaptionResponse(
            key=key,
            captions=[pb.RankedCaption(text=f"caption of {key}", probability=0.5, count=1)] * request.top_k,
            candidates=[f"caption of {key}"] * 10,
        )


@contextlib.contextmanager
def scripted_server():
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    servicer = ScriptedCascade()
    pb_grpc.add_CascadeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def check_retries_scripted():
    RE, UN, IA = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT
    fast = RetryPolicy(max_attempts=4, initial_backoff_s=0.02, max_backoff_s=0.05)
    with scripted_server() as (servicer, target):
        waits = []
        client = CaptionClient(target, retry=fast, timeout=10,
                               on_retry=lambda n, e, delay: waits.append((n, e.code(), delay)))

        def run(script, **kwargs):
            servicer.script.extend(script)
            before, calls_before = client.retries, len(servicer.requests)
            try:
                outcome = client.caption(b"\x89PNG fake", **kwargs)
            except grpc.RpcError as e:
                outcome = e
            return outcome, client.retries - before, len(servicer.requests) - calls_before

        outcome, retries, calls = run([(RE, "server is full"), (RE, "server is full")])
        if isinstance(outcome, grpc.RpcError) or (retries, calls) != (2, 3):
            fail(f"RESOURCE_EXHAUSTED twice then OK: {outcome!r}, {retries} retries, {calls} calls")
        if [(n, c) for n, c, _ in waits] != [(1, RE), (2, RE)] or not all(0 <= d <= 0.05 for *_, d in waits):
            fail(f"retry hook saw {waits}")

        outcome, retries, calls = run([(UN, "connection reset")])
        if isinstance(outcome, grpc.RpcError) or (retries, calls) != (1, 2):
            fail(f"UNAVAILABLE then OK: {outcome!r}, {retries} retries, {calls} calls")

        outcome, retries, calls = run([(IA, "image: not an image")])
        if not isinstance(outcome, grpc.RpcError) or outcome.code() != IA or (retries, calls) != (0, 1):
            fail(f"INVALID_ARGUMENT must fail at once: {outcome!r}, {retries} retries, {calls} calls")

        outcome, retries, calls = run([(RE, "request message of 9 bytes is over this server's limit of 4 bytes")])
        if not isinstance(outcome, grpc.RpcError) or (retries, calls) != (0, 1):
            fail(f"an oversized message must not be retried: {outcome!r}, {retries} retries, {calls} calls")

        outcome, retries, calls = run([(RE, "full")] * 10)
        servicer.script.clear()
        if not isinstance(outcome, grpc.RpcError) or outcome.code() != RE or (retries, calls) != (3, 4):
            fail(f"attempts must stop at max_attempts=4: {outcome!r}, {retries} retries, {calls} calls")
        client.close()

        # The backoff's ceiling grows by the multiplier and stops at max_backoff_s.
        policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
        rng = random.Random(1)
        for n, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
            delays = [policy.backoff_s(n, rng) for _ in range(200)]
            if not (0 <= min(delays) and max(delays) <= cap and max(delays) > 0.8 * cap):
                fail(f"retry {n}: waits {min(delays):.3f}..{max(delays):.3f}, want jitter up to {cap}")

        # A token without TLS is sent on loopback only (local credentials), as a bearer token.
        with CaptionClient(target, token="s3cret") as client:
            client.caption("http://127.0.0.1/x.png")
        if servicer.metadata[-1].get("authorization") != "Bearer s3cret":
            fail(f"token metadata: {servicer.metadata[-1]}")

        # The handler: the origin's request, batch order kept, one PredictionResult per example.
        handler = CascadeModelHandler(target, max_batch_size=5, concurrency=3)
        if handler.batch_elements_kwargs() != {"max_batch_size": 5}:
            fail(f"batch_elements_kwargs: {handler.batch_elements_kwargs()}")
        model = handler.load_model()
        batch = [f"http://127.0.0.1/img{i}.png" for i in range(5)]
        seen = len(servicer.requests)
        results = list(handler.run_inference(batch, model))
        if [r.example for r in results] != batch or [r.inference[0].text for r in results] != [
            f"caption of {u}" for u in batch
        ]:
            fail(f"handler results out of order: {results}")
        for request in servicer.requests[seen:]:
            if not (request.each_candidate and request.top_k == TOP_K
                    and request.params.preset == pb.PRESET_NOTEBOOK):
                fail(f"handler request is not the origin's: {request}")
        # A failure that retries cannot mend fails the batch (RunInference's DLQ can take it).
        servicer.script.append((IA, "image: not an image"))
        try:
            handler.run_inference(batch[:3], model)
            fail("a batch with a failed image succeeded")
        except grpc.RpcError as e:
            if e.code() != IA:
                fail(f"the batch failed with {e.code()}, want INVALID_ARGUMENT")
        model.close()


# --- images over HTTP ---------------------------------------------------------------------------

class Images(http.server.SimpleHTTPRequestHandler):
    """Serves examples/images; /hold/<name> waits for `release` before answering."""

    hold_requested = threading.Event()
    release = threading.Event()

    def do_GET(self):
        if self.path.startswith("/hold/"):
            Images.hold_requested.set()
            Images.release.wait(timeout=60)
            self.path = self.path[len("/hold"):]
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def image_server():
    handler = functools.partial(Images, directory=str(IMAGES))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        Images.release.set()
        server.shutdown()


# --- 3. retries against the real server --------------------------------------------------------

def check_retries_real(limited, http_base):
    holder_client = CaptionClient(limited, retry=RetryPolicy(max_attempts=1), timeout=60)
    holder = {}

    def hold():
        try:
            holder["result"] = holder_client.caption(f"{http_base}/hold/scene_3.png")
        except grpc.RpcError as e:
            holder["error"] = e

    holder_thread = threading.Thread(target=hold)
    holder_thread.start()
    if not Images.hold_requested.wait(timeout=30):
        fail("the holder's image was never fetched")

    refusals = []

    def on_retry(n, error, delay):
        refusals.append((n, error.code(), error.details()))
        # Free the slot once we have been refused, and wait for the holder to finish.
        Images.release.set()
        holder_thread.join(timeout=60)

    client = CaptionClient(limited, timeout=60, on_retry=on_retry,
                           retry=RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5))
    scene_1 = (IMAGES / "scene_1.png").read_bytes()
    result = client.caption(scene_1, params={"decoding": "DECODING_GREEDY", "num_candidates": 2}, top_k=1)
    if not refusals or refusals[0][1] != grpc.StatusCode.RESOURCE_EXHAUSTED:
        fail(f"the call was never refused with RESOURCE_EXHAUSTED while the slot was held: {refusals}")
    if not result.key.startswith("sha256:") or not result.captions:
        fail(f"the retried call's answer: {result}")
    if "error" in holder or holder.get("result") is None:
        fail(f"the holder's call failed: {holder}")

    before = client.retries
    try:
        client.caption(b"not an image")
        fail("garbage bytes were captioned")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"garbage bytes: {e.code()} {e.details()}")
    if client.retries != before:
        fail("INVALID_ARGUMENT was retried")
    client.close()
    holder_client.close()
    return {"refused_then_retried": len(refusals), "refusal": refusals[0][2]}


# --- 4. the origin pipeline --------------------------------------------------------------------

BLOCK = re.compile(
    r"Image: (?P<name>[^\n]*)\n"
    r"\tTop (?P<k>\d+) captions ranked by CLIP:\n"
    r"(?P<lines>(?:\t\t[^\n]*\n)*)"
    r"\n\n"
)
LINE = re.compile(r"\t\t(?P<rank>\d+): (?P<text>.*)\. \(Caption probability: (?P<p>\d+\.\d\d)\)")


def check_each_candidate(target, http_base):
    """The server lists every candidate when asked: greedy makes all 10 candidates the same
    caption, which a server that ignored each_candidate would merge into one entry of count 10."""
    with CaptionClient(target, timeout=60) as client:
        r = client.caption(f"{http_base}/scene_1.png", top_k=TOP_K, each_candidate=True,
                           params={"decoding": "DECODING_GREEDY", "num_candidates": 10})
        merged = client.caption(f"{http_base}/scene_1.png", top_k=TOP_K, each_candidate=False,
                                params={"decoding": "DECODING_GREEDY", "num_candidates": 10})
    if len(r.captions) != TOP_K or any(c.count != 1 or c.text != r.captions[0].text for c in r.captions):
        fail(f"each_candidate=true must list {TOP_K} copies of the one greedy caption: {r}")
    if len(merged.captions) != 1 or merged.captions[0].count != 10 or abs(merged.captions[0].probability - 1) > 1e-4:
        fail(f"each_candidate=false must merge the 10 copies into one: {merged}")
    if abs(sum(c.probability for c in r.captions) - TOP_K / 10) > 1e-3:
        fail(f"each copy's probability is its own softmax share (1/10): {r}")


def check_output(stdout, urls, expected):
    """The blocks are exactly the origin's format, one per URL, with plausible captions."""
    blocks = list(BLOCK.finditer(stdout))
    if "".join(b.group(0) for b in blocks) != stdout:
        fail(f"stdout is not a sequence of origin blocks:\n{stdout!r}")
    names = collections.Counter(b.group("name") for b in blocks)
    # The origin's rule: os.path.basename(url).rsplit('.')[0] (scene_2.png and .jpg are both scene_2).
    want = collections.Counter(os.path.basename(u).rsplit(".")[0] for u in urls)
    if names != want:
        fail(f"image names {sorted(names.elements())}, want {sorted(want.elements())}")
    true_top = 0
    for b in blocks:
        name = b.group("name")
        if int(b.group("k")) != TOP_K:
            fail(f"{name}: header says Top {b.group('k')}")
        lines = b.group("lines").splitlines()
        # Each candidate is listed, duplicates included: always K lines (10 candidates >= K).
        if len(lines) != TOP_K:
            fail(f"{name}: {len(lines)} caption lines, want {TOP_K}")
        parsed = []
        for rank, line in enumerate(lines, 1):
            m = LINE.fullmatch(line)
            if not m or int(m.group("rank")) != rank:
                fail(f"{name}: line {rank} is not the origin's format: {line!r}")
            p = float(m.group("p"))
            if not (0.0 <= p <= 1.0) or math.isnan(p):
                fail(f"{name}: probability {p} outside [0, 1]")
            parsed.append((m.group("text"), p))
        probs = [p for _, p in parsed]
        if any(a < b for a, b in zip(probs, probs[1:])):
            fail(f"{name}: probabilities not non-increasing: {probs}")
        if sum(probs) > 1.0 + 0.005 * len(probs):
            fail(f"{name}: listed probabilities sum to {sum(probs)} > 1")
        if parsed[0][0] == expected[name]:
            true_top += 1
        else:
            print(f"note: {name}: top caption {parsed[0][0]!r}, true {expected[name]!r}", file=sys.stderr)
    if true_top < MIN_TRUE_TOP:
        fail(f"only {true_top} of {len(blocks)} top captions are the scenes' true captions")
    return {"blocks": len(blocks), "true_top": true_top}


def check_same_as_client(stdout, target, urls):
    """The printed captions are the service's answers: the same seeded calls made directly."""
    params = pb.GenerationParams(preset=pb.PRESET_NOTEBOOK, seed=SEED, **PARAMS_OVER_PRESET)
    with CaptionClient(target, timeout=60) as client:
        results = client.caption_many(urls, concurrency=4, top_k=TOP_K, each_candidate=True, params=params)
    printed = {}
    for b in BLOCK.finditer(stdout):
        printed.setdefault(b.group("name"), []).append(
            [(m.group("text"), float(m.group("p"))) for m in map(LINE.fullmatch, b.group("lines").splitlines())])
    for url, result in zip(urls, results):
        name = os.path.basename(url).rsplit(".")[0]
        direct = [(c.text, c.probability) for c in result.captions]
        if not any(len(p) == len(direct) and all(t1 == t2 and abs(p1 - p2) <= 0.0101 for (t1, p1), (t2, p2)
                                                  in zip(p, direct)) for p in printed[name]):
            fail(f"{name}: printed {printed[name]}, a direct call answers {direct}")


def run_pipeline(target, http_base, workdir):
    urls = [f"{http_base}/{p.name}" for p in sorted(IMAGES.iterdir()) if p.suffix in (".png", ".jpg")]
    # Most URLs from a file, one as an argument: both inputs of the CLI, flattened.
    (workdir / "urls.txt").write_text("# example scenes\n" + "\n".join(urls[1:]) + "\n\n")
    command = [
        sys.executable, "-m", "caption_cascade_client.origin_pipeline",
        "--target", target, "--input", str(workdir / "urls.txt"), urls[0],
        "--top-k", str(TOP_K), "--seed", str(SEED), "--params", json.dumps(PARAMS_OVER_PRESET),
        "--batch-size", "4", "--concurrency", "4",
        "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading",
    ]
    start = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir)
    elapsed = time.monotonic() - start
    sys.stderr.write(run.stderr[-4000:])
    if run.returncode != 0:
        fail(f"the pipeline failed ({run.returncode}); stdout:\n{run.stdout}")
    print(run.stdout, end="")
    return urls, run.stdout, elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--limited", required=True)
    args = parser.parse_args()
    expected = json.loads((IMAGES / "expected.json").read_text())
    expected = {os.path.basename(k).rsplit(".")[0]: v for k, v in expected.items()}
    summary = {}
    timings = {}

    t = time.monotonic()
    check_installed_package()
    check_retries_scripted()
    timings["scripted_s"] = round(time.monotonic() - t, 2)
    with image_server() as http_base, tempfile.TemporaryDirectory(prefix="cc-beam-") as tmp:
        t = time.monotonic()
        summary["retry_real"] = check_retries_real(args.limited, http_base)
        timings["retry_real_s"] = round(time.monotonic() - t, 2)
        check_each_candidate(args.target, http_base)
        urls, stdout, timings["pipeline_s"] = run_pipeline(args.target, http_base, pathlib.Path(tmp))
        summary.update(check_output(stdout, urls, expected))
        check_same_as_client(stdout, args.target, urls)
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

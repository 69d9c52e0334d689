"""The origin's Beam pipeline as a client of the Cascade service, run by tests/beam_pipeline.rs
with .venv-beam's Python (apache-beam and the installed caption-cascade-client package).

    test_pipeline.py --target HOST:PORT --limited HOST:PORT

--target is a server started with --fetch-allow 127.0.0.1/32; --limited one also started with
--max-inflight 1 and --fetch-timeout-s 30. Images come from examples/images over a local HTTP
server on 127.0.0.1. Each check raises with what it saw; the last stdout line is a JSON summary.

1. The installed package is current: its stubs are what generate.py makes from the repository's
   proto now, and its modules are the sources in clients/python (else: run `make beam-env`).
2. The client's retry policy against a scripted in-process gRPC server that attaches the
   structured details the real server does (google.rpc.ErrorInfo, RetryInfo): UNAVAILABLE, and
   RESOURCE_EXHAUSTED with a RetryInfo, are retried with bounded, growing, jittered waits of at
   least the server's delay, and bounded attempts; INVALID_ARGUMENT, and RESOURCE_EXHAUSTED
   without a RetryInfo (an oversized message), are not, whatever the message says; the bearer
   token arrives as `authorization: Bearer <token>`; the model handler sends the origin's request
   (notebook preset, each candidate, top 3), keeps batch order, and a failed image of a batch
   becomes that image's CaptionFailure while the others are answered.
3. The same against the real server: a call refused with RESOURCE_EXHAUSTED (the one admission
   slot held by a call whose image fetch is parked; details SERVER_BUSY with a RetryInfo)
   succeeds on retry; INVALID_ARGUMENT is raised after one attempt, as a CaptionError with the
   image's key and the server's reason.
4. The server honours each_candidate (every candidate listed with its own probability, as the
   origin prints them), and the origin pipeline (python -m caption_cascade_client.origin_pipeline)
   on the DirectRunner captions the nine example images, printing exactly the origin's blocks
   with the service's answers (check_output, check_same_as_client), while a tenth URL that the
   server may not fetch goes to the failure output (stderr) and the --output file with its
   code: the pipeline succeeds and the others are printed and written all the same.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import filecmp
import functools
import hashlib
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

from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

import caption_cascade_client
from caption_cascade_client import CaptionClient, CaptionError, RetryPolicy, pb, pb_grpc, status_details
from caption_cascade_client.beam import CaptionFailure, CascadeModelHandler
from caption_cascade_client.origin_pipeline import parse_args

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

def detailed(code, message, reason=None, retry_delay_s=None):
    """A scripted failure: code, message, and the details the real server attaches."""
    return code, message, reason, retry_delay_s


class ScriptedCascade(pb_grpc.CascadeServicer):
    """Answers Caption calls with the next scripted failure; OK answers echo the request. A
    request whose image URL ends in "/bad" fails with INVALID_ARGUMENT whatever the script."""

    def __init__(self):
        self.script = collections.deque()
        self.requests = []
        self.metadata = []
        self.lock = threading.Lock()

    def Caption(self, request, context):
        with self.lock:
            self.requests.append(request)
            self.metadata.append(dict(context.invocation_metadata()))
            if request.image.url.endswith("/bad"):
                failure = detailed(grpc.StatusCode.INVALID_ARGUMENT, "image: not an image", "IMAGE_UNDECODABLE")
            else:
                failure = self.script.popleft() if self.script else None
        if failure is not None:
            code, message, reason, retry_delay_s = failure
            status = status_pb2.Status(code=code.value[0], message=message)
            if reason is not None:
                status.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason, domain="caption.v1"))
            if retry_delay_s is not None:
                delay = duration_pb2.Duration()
                delay.FromNanoseconds(int(retry_delay_s * 1e9))
                status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
            context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
            context.abort(code, message)
        key = request.image.url or "sha256:fake"
        return pb.CaptionResponse(
            key=key,
            captions=[pb.RankedCaption(text=f"caption of {key}", probability=0.5, cosine=0.25, logit=25.0,
                                       index=i, count=1) for i in range(request.top_k)],
            candidates=[f"caption of {key}"] * 10,
            timings=pb.Timings(total_ms=12.5),
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
    busy = detailed(RE, "server is full", "SERVER_BUSY", retry_delay_s=0.03)
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

        outcome, retries, calls = run([busy, busy])
        if isinstance(outcome, grpc.RpcError) or (retries, calls) != (2, 3):
            fail(f"RESOURCE_EXHAUSTED with a RetryInfo twice then OK: {outcome!r}, {retries} retries, {calls} calls")
        # At least the server's 30 ms, plus a jitter of at most the backoff's ceiling.
        if [(n, c) for n, c, _ in waits] != [(1, RE), (2, RE)] or not all(0.03 <= d <= 0.08 for *_, d in waits):
            fail(f"retry hook saw {waits}")

        outcome, retries, calls = run([detailed(UN, "connection reset")])
        if isinstance(outcome, grpc.RpcError) or (retries, calls) != (1, 2):
            fail(f"UNAVAILABLE then OK: {outcome!r}, {retries} retries, {calls} calls")

        outcome, retries, calls = run([detailed(IA, "image: not an image", "IMAGE_UNDECODABLE")])
        if not isinstance(outcome, CaptionError) or outcome.code() != IA or (retries, calls) != (0, 1):
            fail(f"INVALID_ARGUMENT must fail at once: {outcome!r}, {retries} retries, {calls} calls")
        if outcome.reason != "IMAGE_UNDECODABLE" or not outcome.key.startswith("sha256:"):
            fail(f"the error's reason and key: {outcome.reason!r} {outcome.key!r}")

        # Decided by the details, never the text: an oversized message (no RetryInfo) is not
        # retried even when its text reads like a full server's, and the other way round.
        too_large = detailed(RE, "the server is full, retry later", "MESSAGE_TOO_LARGE")
        outcome, retries, calls = run([too_large])
        if not isinstance(outcome, grpc.RpcError) or (retries, calls) != (0, 1):
            fail(f"an oversized message must not be retried: {outcome!r}, {retries} retries, {calls} calls")
        if status_details(outcome).reason != "MESSAGE_TOO_LARGE" or status_details(outcome).retry_delay_s is not None:
            fail(f"details of the oversized message: {status_details(outcome)}")
        outcome, retries, calls = run([detailed(RE, "message is over this server's limit of 4 bytes", "SERVER_BUSY", 0.0)])
        if isinstance(outcome, grpc.RpcError) or (retries, calls) != (1, 2):
            fail(f"a RetryInfo makes it worth retrying: {outcome!r}, {retries} retries, {calls} calls")
        outcome, retries, calls = run([detailed(RE, "no details at all")])
        if not isinstance(outcome, grpc.RpcError) or (retries, calls) != (0, 1):
            fail(f"RESOURCE_EXHAUSTED without details must not be retried: {outcome!r}, {retries}, {calls}")

        outcome, retries, calls = run([busy] * 10)
        servicer.script.clear()
        if not isinstance(outcome, grpc.RpcError) or outcome.code() != RE or (retries, calls) != (3, 4):
            fail(f"attempts must stop at max_attempts=4: {outcome!r}, {retries} retries, {calls} calls")

        # Every field of the answer is there.
        result = client.caption("http://127.0.0.1/x.png", top_k=2)
        first = result.captions[0]
        if (first.cosine, first.logit, first.index, first.count) != (0.25, 25.0, 0, 1) or result.timings.total_ms != 12.5:
            fail(f"answer fields: {result}")
        client.close()

        # The backoff's ceiling grows by the multiplier and stops at max_backoff_s.
        policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
        rng = random.Random(1)
        for n, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
            delays = [policy.backoff_s(n, rng) for _ in range(200)]
            if not (0 <= min(delays) and max(delays) <= cap and max(delays) > 0.8 * cap):
                fail(f"retry {n}: waits {min(delays):.3f}..{max(delays):.3f}, want jitter up to {cap}")

        # A token without TLS goes to loopback as a bearer token; elsewhere only when asked to.
        with CaptionClient(target, token="s3cret") as client:
            client.caption("http://127.0.0.1/x.png")
        if servicer.metadata[-1].get("authorization") != "Bearer s3cret":
            fail(f"token metadata: {servicer.metadata[-1]}")
        try:
            CaptionClient("captions.internal:50051", token="s3cret")
            fail("a token over plaintext to another host was accepted without insecure_token")
        except ValueError as e:
            if "insecure_token" not in str(e):
                fail(f"the refusal does not say how to allow it: {e}")
        CaptionClient("captions.internal:50051", token="s3cret", insecure_token=True).close()

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
        # A failure that retries cannot mend is that image's alone: the batch is answered.
        mixed = [batch[0], "http://127.0.0.1/bad", batch[2]]
        results = list(handler.run_inference(mixed, model))
        failure = results[1].inference
        if failure != CaptionFailure("http://127.0.0.1/bad", "INVALID_ARGUMENT", "image: not an image",
                                     "IMAGE_UNDECODABLE"):
            fail(f"the failed image's inference: {failure!r}")
        if [r.inference[0].text for r in (results[0], results[2])] != [f"caption of {batch[0]}", f"caption of {batch[2]}"]:
            fail(f"the batch's other images: {results}")
        model.close()

    # The pipeline's flags are the CLI's, the old names kept as aliases.
    args, _ = parse_args(["--endpoint", "h:1", "--endpoint-ca", "ca.pem", "--endpoint-token-file", "t", "http://x/a.png"])
    old, _ = parse_args(["--target", "h:1", "--tls-ca", "ca.pem", "--token-file", "t", "http://x/a.png"])
    if (args.endpoint, args.endpoint_ca, args.endpoint_token_file) != ("h:1", "ca.pem", "t") or vars(args) != vars(old):
        fail(f"flags: {vars(args)} vs aliases {vars(old)}")


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
        refusals.append((n, error.code(), error.details(), status_details(error)))
        # Free the slot once we have been refused, and wait for the holder to finish.
        Images.release.set()
        holder_thread.join(timeout=60)

    client = CaptionClient(limited, timeout=60, on_retry=on_retry,
                           retry=RetryPolicy(max_attempts=6, initial_backoff_s=0.05, max_backoff_s=0.5))
    scene_1 = (IMAGES / "scene_1.png").read_bytes()
    result = client.caption(scene_1, params={"decoding": "DECODING_GREEDY", "num_candidates": 2}, top_k=1)
    if not refusals or refusals[0][1] != grpc.StatusCode.RESOURCE_EXHAUSTED:
        fail(f"the call was never refused with RESOURCE_EXHAUSTED while the slot was held: {refusals}")
    told = refusals[0][3]
    if told is None or told.reason != "SERVER_BUSY" or told.metadata.get("flag") != "--max-inflight" \
            or told.retry_delay_s is None:
        fail(f"the refusal's details: {told}")
    if not result.key.startswith("sha256:") or not result.captions:
        fail(f"the retried call's answer: {result}")
    if "error" in holder or holder.get("result") is None:
        fail(f"the holder's call failed: {holder}")

    before = client.retries
    try:
        client.caption(b"not an image")
        fail("garbage bytes were captioned")
    except CaptionError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT or e.reason != "IMAGE_UNDECODABLE":
            fail(f"garbage bytes: {e.code()} {e.reason} {e.details()}")
        if e.key != "sha256:" + hashlib.sha256(b"not an image").hexdigest():
            fail(f"garbage bytes' key: {e.key}")
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
    # An address outside the server's --fetch-allow: refused before any connection is made.
    forbidden = "http://127.0.0.2:9/forbidden.png"
    # Most URLs from a file, one as an argument: both inputs of the CLI, flattened. The forbidden
    # one among the good ones, so it shares a batch with them.
    listed = urls[1:4] + [forbidden] + urls[4:]
    (workdir / "urls.txt").write_text("# example scenes\n" + "\n".join(listed) + "\n\n")
    output = workdir / "captions.jsonl"
    command = [
        sys.executable, "-m", "caption_cascade_client.origin_pipeline",
        "--endpoint", target, "--input", str(workdir / "urls.txt"), urls[0], "--output", str(output),
        "--top-k", str(TOP_K), "--seed", str(SEED), "--params", json.dumps(PARAMS_OVER_PRESET),
        "--batch-size", "4", "--concurrency", "4",
        "--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=multi_threading",
    ]
    start = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=workdir)
    elapsed = time.monotonic() - start
    sys.stderr.write(run.stderr[-4000:])
    if run.returncode != 0:
        fail(f"the pipeline failed ({run.returncode}) over one forbidden image; stdout:\n{run.stdout}")
    print(run.stdout, end="")
    failed = check_failure(run.stderr, output, urls, forbidden)
    return urls, run.stdout, elapsed, failed


def check_failure(stderr, output, urls, forbidden):
    """The forbidden image is reported on stderr and in --output with its code; every good image
    has its captions in --output."""
    if f"Image: forbidden failed: PERMISSION_DENIED" not in stderr:
        fail(f"stderr does not report the forbidden image:\n{stderr[-2000:]}")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    by_image = {r["image"]: r for r in records}
    if len(records) != len(urls) + 1 or set(by_image) != set(urls) | {forbidden}:
        fail(f"--output holds {sorted(by_image)}, want the {len(urls)} good URLs and the forbidden one")
    error = by_image[forbidden].get("error") or {}
    if error.get("code") != "PERMISSION_DENIED" or error.get("reason") != "DESTINATION_DENIED" or not error.get("message"):
        fail(f"the forbidden image's record: {by_image[forbidden]}")
    for url in urls:
        record = by_image[url]
        captions = record.get("captions") or []
        if "error" in record or len(captions) != TOP_K or record["key"] != url or len(record["candidates"]) != 10:
            fail(f"{url}: record {record}")
        if not all(0 < c["cosine"] <= 1 and 0 <= c["probability"] <= 1 and c["count"] == 1 for c in captions):
            fail(f"{url}: caption fields {captions}")
    return {"image": forbidden, **error}


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
        urls, stdout, timings["pipeline_s"], summary["failed"] = run_pipeline(args.target, http_base, pathlib.Path(tmp))
        summary.update(check_output(stdout, urls, expected))
        check_same_as_client(stdout, args.target, urls)
    summary["timings"] = {k: round(v, 2) for k, v in timings.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

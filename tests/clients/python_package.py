"""The installed caption-cascade-client package, used as its README says, against a real server.
Run by tests/python_client.rs with the Python of a fresh venv the package was pip-installed into,
from a directory outside the checkout. Prints one JSON object with what it saw; each check
raises with what it saw instead.

Usage: python_package.py HOST:PORT IMAGES_DIR VENV

The server was started with --allow-file-dir IMAGES_DIR and --max-message-bytes 65536.
"""

import hashlib
import io
import json
import pathlib
import sys

import grpc

import caption_cascade_client
from caption_cascade_client import CaptionClient, CaptionError, RetryPolicy


def fail(message):
    raise AssertionError(message)


def main():
    addr, images, venv = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]).resolve()
    installed = pathlib.Path(caption_cascade_client.__file__).resolve()
    if venv not in installed.parents:
        fail(f"caption_cascade_client comes from {installed}, not the venv {venv}")
    scene = images / "scene_1.png"
    data = scene.read_bytes()
    seen = {"module": str(installed)}
    with CaptionClient(addr, timeout=60) as client:
        greedy = {"decoding": "DECODING_GREEDY", "num_candidates": 2}
        # Everything a user may have for an image; the bytes travel, and the key says so.
        answers = {
            "path_str": client.caption(str(scene), params=greedy),
            "path": client.caption(scene, params=greedy),
            "bytes": client.caption(data, params=greedy),
            "file": client.caption(io.BytesIO(data), params=greedy),
        }
        with open(scene, "rb") as f:
            answers["open_file"] = client.caption(f, params=greedy)
        answers["url"] = client.caption(scene.as_uri(), params=greedy)
        want_key = "sha256:" + hashlib.sha256(data).hexdigest()
        for name, result in answers.items():
            key = scene.as_uri() if name == "url" else want_key
            if result.key != key:
                fail(f"{name}: key {result.key}, want {key}")
            if result.captions[0].text != answers["bytes"].captions[0].text:
                fail(f"{name}: top caption {result.captions[0].text!r} differs from the bytes' one")
        top = answers["path"].captions[0]
        if not (0 < top.cosine <= 1 and top.logit > 0 and top.count == 2 and top.index == 0):
            fail(f"caption fields: {top}")
        if answers["path"].timings.total_ms <= 0 or len(answers["path"].candidates) != 2:
            fail(f"timings / candidates: {answers['path']}")
        seen["caption"] = top._asdict()

        generated = client.generate(scene, params={"num_candidates": 3, "seed": 2})
        if len(generated.candidates) != 3 or not all(c.token_ids for c in generated.candidates):
            fail(f"generate: {generated}")
        ranked = client.rank(scene, [top.text, "a small red square on a black background"])
        if ranked.captions[0].index != 0 or abs(sum(c.probability for c in ranked.captions) - 1) > 1e-4:
            fail(f"rank: {ranked}")
        seen["rank"] = [c._asdict() for c in ranked.captions]

        try:
            client.caption("no/such/file.png")
            fail("a str that is neither a URL nor a file was sent")
        except ValueError as e:
            if "URL" not in str(e) or "file" not in str(e):
                fail(f"the refusal names both options: {e}")

        try:
            client.caption(b"not an image")
            fail("garbage bytes were captioned")
        except CaptionError as e:
            seen["bad_image"] = {"code": e.code_name, "reason": e.reason}

    # Over --max-message-bytes: RESOURCE_EXHAUSTED without a RetryInfo, so not retried.
    retries = []
    with CaptionClient(addr, timeout=60, retry=RetryPolicy(max_attempts=5, initial_backoff_s=0.01),
                       on_retry=lambda n, e, d: retries.append(n)) as client:
        try:
            client.caption(b"\x89PNG" + bytes(100_000))
            fail("an oversized message was accepted")
        except CaptionError as e:
            seen["too_large"] = {"code": e.code_name, "reason": e.reason, "retries": len(retries),
                                 "flag": e.status_details.metadata.get("flag") if e.status_details else None}
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                fail(f"oversized: {e}")
    print(json.dumps(seen))


if __name__ == "__main__":
    main()

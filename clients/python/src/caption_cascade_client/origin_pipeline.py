"""The origin's image-captioning pipeline (Beam's RunInference BLIP + CLIP cascade example), with
the two models behind a caption-cascade server.

    caption-cascade-beam --endpoint HOST:PORT [--input FILE] [URL ...] [--output FILE.jsonl]
        [--top-k 3] [--endpoint-ca CA.pem] [--endpoint-token-file FILE] [--insecure-token]
        [--seed N] [--params JSON] [--merge] [BEAM OPTIONS]

Reads image URLs (positional arguments and/or --input, a text file of one URL per line; blank
lines and lines starting with # are skipped), keys each by its URL, captions them with
RunInference through CascadeModelHandler (BLIP sampling 10 candidates per image, ranked by
CLIP's softmax over them: the notebook preset), and prints the top K per image as the origin
does:

    Image: <file name without extension>
    \tTop K captions ranked by CLIP:
    \t\t1: <caption>. (Caption probability: 0.62)
    ...

followed by two empty lines. An image that fails (after the client's retries) fails alone: it
goes to the pipeline's failure output, is reported on stderr as "Image: <name> failed: CODE
message", and the others are printed all the same. --output writes one JSON object per image,
its captions or its error, as `caption-cascade caption --output` does. The flags are the
caption-cascade CLI's (--endpoint, --endpoint-ca, --endpoint-token-file, with their environment
variables); --target, --tls-ca and --token-file are kept as aliases. Every other option is passed
to Beam as a pipeline option, in the --name=value form (e.g. --runner=DirectRunner
--direct_num_workers=2). The server fetches the URLs; with --fetch-locally the pipeline downloads
them itself and sends the bytes (for images the server may not reach).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.options.pipeline_options import PipelineOptions

from ._pb import caption_pb2 as pb
from .beam import CAPTIONS, FAILURES, CaptionFailure, CaptionImages, CascadeModelHandler
from .client import RetryPolicy, generation_params


def image_name(url: str) -> str:
    """The origin's name for an image: its file name up to the first dot."""
    return os.path.basename(url).rsplit(".")[0]


def format_captions(url: str, captions: Sequence[Tuple], top_k: int) -> str:
    """One image's block, exactly as the origin's FormatCaptions prints it."""
    lines = [f"Image: {image_name(url)}", f"\tTop {top_k} captions ranked by CLIP:"]
    for rank, caption in enumerate(list(captions)[:top_k]):
        lines.append(f"\t\t{rank + 1}: {caption[0]}. (Caption probability: {caption[1]:.2f})")
    # The origin ends each block with print('\n'): two empty lines.
    return "\n".join(lines) + "\n" + "\n\n"


class PrintCaptions(beam.DoFn):
    """Prints each image's block with one write, so parallel workers never interleave lines."""

    def __init__(self, top_k: int):
        self._top_k = top_k

    def process(self, element: Tuple[str, PredictionResult]):
        url, prediction = element
        block = format_captions(url, prediction.inference, self._top_k)
        sys.stdout.write(block)
        sys.stdout.flush()
        yield url, prediction.inference


class PrintFailure(beam.DoFn):
    """Reports a failed image on stderr, one line, beside the origin's printout on stdout."""

    def process(self, failure: CaptionFailure):
        sys.stderr.write(f"Image: {image_name(failure.key)} failed: {failure.code} {failure.message}\n")
        sys.stderr.flush()
        yield failure


def success_record(element) -> str:
    """An image's --output line, as the CLI's: image, key, captions, candidates, total_ms."""
    url, captions = element
    timings = getattr(captions, "timings", None)
    return json.dumps({
        "image": url,
        "key": getattr(captions, "key", "") or url,
        "captions": [{"text": c.text, "probability": c.probability, "cosine": c.cosine, "count": c.count}
                     for c in captions],
        "candidates": list(getattr(captions, "candidates", [])),
        "total_ms": timings.total_ms if timings is not None else None,
    })


def failure_record(failure: CaptionFailure) -> str:
    """A failed image's --output line, as the CLI's: image, key, error {code, message, reason}."""
    error = {"code": failure.code, "message": failure.message}
    if failure.reason:
        error["reason"] = failure.reason
    return json.dumps({"image": failure.key, "key": failure.key, "error": error})


class FetchImage(beam.DoFn):
    """Downloads a keyed URL's image, for --fetch-locally: (url, url) -> (url, bytes); a download
    that fails goes to the FAILURES output."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s

    def process(self, element: Tuple[str, str]):
        url, _ = element
        try:
            with urllib.request.urlopen(url, timeout=self._timeout_s) as response:
                data = response.read()
        except (OSError, ValueError) as e:  # URLError and HTTPError are OSErrors
            # The server's code for an image it could not fetch.
            yield beam.pvalue.TaggedOutput(FAILURES, CaptionFailure(url, "FAILED_PRECONDITION", f"download: {e}",
                                                                    "LOCAL_FETCH_FAILED"))
            return
        yield url, data


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("not a JSON object")
    return value


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(
        prog="caption-cascade-beam",
        description="The origin's BLIP + CLIP image-captioning Beam pipeline, against a caption-cascade server.",
        epilog="Other options go to Beam as pipeline options, written --name=value.",
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="image URLs (http(s):// or file://)")
    parser.add_argument("--endpoint", "--target", dest="endpoint", default=os.environ.get("CAPTION_ENDPOINT"),
                        help="the server: host:port, http://host:port or https://host:port "
                             "(default $CAPTION_ENDPOINT)")
    parser.add_argument("--input", help="a text file of image URLs, one a line")
    parser.add_argument("--output", metavar="FILE",
                        help="write one JSON object per image (its captions, or its error) to this file")
    parser.add_argument("--top-k", "-k", type=int, default=3, help="captions printed per image (default 3)")
    parser.add_argument("--endpoint-ca", "--tls-ca", dest="endpoint_ca", default=os.environ.get("CAPTION_ENDPOINT_CA"),
                        help="PEM CA certificate the server's TLS certificate must chain to "
                             "(default $CAPTION_ENDPOINT_CA)")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--endpoint-token-file", "--token-file", dest="endpoint_token_file",
                        default=os.environ.get("CAPTION_ENDPOINT_TOKEN_FILE"),
                        help="file holding the bearer token the server asks for (default $CAPTION_ENDPOINT_TOKEN_FILE)")
    parser.add_argument("--token", default=os.environ.get("CAPTION_AUTH_TOKEN"),
                        help="the bearer token itself (default $CAPTION_AUTH_TOKEN); prefer --endpoint-token-file")
    parser.add_argument("--insecure-token", action="store_true",
                        help="send the token over plaintext to a non-loopback server (in-cluster traffic only)")
    parser.add_argument("--seed", type=int, help="sampler seed, for repeatable captions (default random)")
    parser.add_argument("--params", type=json_object, default={}, metavar="JSON",
                        help='GenerationParams fields over the notebook preset, e.g. \'{"min_length": 0}\'')
    parser.add_argument("--merge", action="store_true",
                        help="merge identical candidates (summed probability) instead of listing each")
    parser.add_argument("--batch-size", type=int, default=16, help="most images per RunInference batch")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per worker")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call attempt")
    parser.add_argument("--max-attempts", type=int, default=RetryPolicy().max_attempts,
                        help="attempts per image for what can succeed later (a full server, UNAVAILABLE)")
    parser.add_argument("--fetch-locally", action="store_true",
                        help="download the images in the pipeline and send their bytes")
    args, beam_args = parser.parse_known_args(argv)
    if not args.endpoint:
        parser.error("no server: give --endpoint HOST:PORT (or set CAPTION_ENDPOINT)")
    for url in args.urls:
        if "://" not in url:
            parser.error(f"{url!r} is not a URL; Beam options are written --name=value")
    if not args.urls and not args.input:
        parser.error("no images: give URLs or --input FILE")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    if args.token and args.endpoint_token_file:
        parser.error("give --token or --endpoint-token-file, not both")
    try:
        args.params = generation_params(args.params)
    except Exception as e:  # json_format.ParseError names the field and what it accepts
        parser.error(f"--params: {e}")
    return args, beam_args


class Outputs(NamedTuple):
    """What build() adds: the captioned images, (url, captions), and the failed ones, CaptionFailure."""

    captions: beam.PCollection
    failures: beam.PCollection


def build(pipeline: beam.Pipeline, args) -> Outputs:
    """Adds the origin's steps (and the --output sink) to `pipeline`."""
    params = pb.GenerationParams(preset=pb.PRESET_NOTEBOOK)
    params.MergeFrom(args.params)
    if args.seed is not None:
        params.seed = args.seed
    handler = CascadeModelHandler(
        args.endpoint,
        tls_ca=args.endpoint_ca,
        tls=args.tls or None,
        token=args.token,
        token_file=args.endpoint_token_file,
        insecure_token=args.insecure_token,
        top_k=args.top_k,
        each_candidate=not args.merge,
        params=params,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts),
        concurrency=args.concurrency,
        max_batch_size=args.batch_size,
    )
    sources = []
    if args.urls:
        sources.append(pipeline | "URLs" >> beam.Create(args.urls))
    if args.input:
        sources.append(
            pipeline
            | "ReadInput" >> beam.io.ReadFromText(args.input)
            | "SkipBlanks" >> beam.Map(str.strip)
            | "SkipComments" >> beam.Filter(lambda line: line and not line.startswith("#"))
        )
    urls = sources[0] if len(sources) == 1 else tuple(sources) | "AllURLs" >> beam.Flatten()
    # Keyed by the image URL, as the origin keys both of its models.
    keyed = urls | "KeyByURL" >> beam.Map(lambda url: (url, url))
    failed = []
    if args.fetch_locally:
        fetched = keyed | "ReadImages" >> beam.ParDo(FetchImage(args.timeout)).with_outputs(FAILURES, main="images")
        keyed = fetched.images
        failed.append(fetched[FAILURES])
    results = keyed | "CaptionAndRank" >> CaptionImages(handler)
    failed.append(results[FAILURES])
    failures = (tuple(failed) | "AllFailures" >> beam.Flatten()) | "PrintFailures" >> beam.ParDo(PrintFailure())
    captions = results[CAPTIONS] | "PrintCaptions" >> beam.ParDo(PrintCaptions(args.top_k))
    if args.output:
        records = (
            captions | "CaptionRecords" >> beam.Map(success_record),
            failures | "FailureRecords" >> beam.Map(failure_record),
        ) | "AllRecords" >> beam.Flatten()
        # One file at exactly the path given (no shard suffix), as the CLI's --output.
        records | "WriteOutput" >> beam.io.WriteToText(args.output, shard_name_template="")
    return Outputs(captions, failures)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, beam_args = parse_args(argv)
    try:
        pipeline = beam.Pipeline(options=PipelineOptions(beam_args))
        build(pipeline, args)
    except ValueError as e:  # the handler's check of the connection flags
        sys.exit(f"caption-cascade-beam: {e}")
    pipeline.run().wait_until_finish()


if __name__ == "__main__":
    main()

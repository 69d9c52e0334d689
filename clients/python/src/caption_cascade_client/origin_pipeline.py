"""The origin's image-captioning pipeline (Beam's RunInference BLIP + CLIP cascade example), with
the two models behind a Cascade server.

    python -m caption_cascade_client.origin_pipeline --target HOST:PORT [--input FILE] [URL ...]
        [--top-k 3] [--tls-ca CA.pem] [--token TOKEN] [--seed N] [--params JSON] [--merge]
        [BEAM OPTIONS]

Reads image URLs (positional arguments and/or --input, a text file of one URL per line; blank
lines and lines starting with # are skipped), keys each by its URL, captions them with
RunInference through CascadeModelHandler (BLIP sampling 10 candidates per image, ranked by
CLIP's softmax over them: the notebook preset), and prints the top K per image as the origin
does:

    Image: <file name without extension>
    \tTop K captions ranked by CLIP:
    \t\t1: <caption>. (Caption probability: 0.62)
    ...

followed by two empty lines. Every other option is passed to Beam as a pipeline option, in the
--name=value form (e.g. --runner=DirectRunner --direct_num_workers=2). The server fetches the
URLs; with --fetch-locally the pipeline downloads them itself and sends the bytes (for images
the server may not reach).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from typing import Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from ._pb import caption_pb2 as pb
from .beam import CascadeModelHandler
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


class FetchImage(beam.DoFn):
    """Downloads a keyed URL's image, for --fetch-locally: (url, url) -> (url, bytes)."""

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s

    def process(self, element: Tuple[str, str]):
        url, _ = element
        with urllib.request.urlopen(url, timeout=self._timeout_s) as response:
            yield url, response.read()


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
        description="The origin's BLIP + CLIP image-captioning Beam pipeline, against a Cascade server.",
        epilog="Other options go to Beam as pipeline options, written --name=value.",
    )
    parser.add_argument("urls", nargs="*", metavar="URL", help="image URLs (http(s):// or file://)")
    parser.add_argument("--target", required=True, help="the Cascade server, host:port")
    parser.add_argument("--input", help="a text file of image URLs, one a line")
    parser.add_argument("--top-k", type=int, default=3, help="captions printed per image (default 3)")
    parser.add_argument("--tls-ca", help="CA certificate (PEM) of the server's TLS certificate")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's roots")
    parser.add_argument("--token", default=os.environ.get("CAPTION_AUTH_TOKEN"),
                        help="bearer token (default $CAPTION_AUTH_TOKEN)")
    parser.add_argument("--seed", type=int, help="sampler seed, for repeatable captions (default random)")
    parser.add_argument("--params", type=json_object, default={}, metavar="JSON",
                        help='GenerationParams fields over the notebook preset, e.g. \'{"min_length": 0}\'')
    parser.add_argument("--merge", action="store_true",
                        help="merge identical candidates (summed probability) instead of listing each")
    parser.add_argument("--batch-size", type=int, default=16, help="most images per RunInference batch")
    parser.add_argument("--concurrency", type=int, default=8, help="calls in flight per worker")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call attempt")
    parser.add_argument("--max-attempts", type=int, default=RetryPolicy().max_attempts,
                        help="attempts per image on RESOURCE_EXHAUSTED / UNAVAILABLE")
    parser.add_argument("--fetch-locally", action="store_true",
                        help="download the images in the pipeline and send their bytes")
    args, beam_args = parser.parse_known_args(argv)
    for url in args.urls:
        if "://" not in url:
            parser.error(f"{url!r} is not a URL; Beam options are written --name=value")
    if not args.urls and not args.input:
        parser.error("no images: give URLs or --input FILE")
    if args.top_k < 1:
        parser.error("--top-k must be at least 1")
    try:
        args.params = generation_params(args.params)
    except Exception as e:  # json_format.ParseError names the field and what it accepts
        parser.error(f"--params: {e}")
    return args, beam_args


def build(pipeline: beam.Pipeline, args) -> beam.PCollection:
    """Adds the origin's steps to `pipeline`; returns the (url, ranked captions) collection."""
    params = pb.GenerationParams(preset=pb.PRESET_NOTEBOOK)
    params.MergeFrom(args.params)
    if args.seed is not None:
        params.seed = args.seed
    handler = CascadeModelHandler(
        args.target,
        tls_ca=args.tls_ca,
        tls=args.tls or None,
        token=args.token,
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
    if args.fetch_locally:
        keyed = keyed | "ReadImages" >> beam.ParDo(FetchImage(args.timeout))
    return (
        keyed
        | "CaptionAndRank" >> RunInference(KeyedModelHandler(handler))
        | "PrintCaptions" >> beam.ParDo(PrintCaptions(args.top_k))
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, beam_args = parse_args(argv)
    with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
        build(pipeline, args)


if __name__ == "__main__":
    main()

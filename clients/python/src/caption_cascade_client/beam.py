"""An Apache Beam RunInference model handler that captions images with a caption-cascade server,
and a transform that keeps a failed image from failing anything else.

    import apache_beam as beam
    from caption_cascade_client.beam import CascadeModelHandler, CaptionImages

    handler = CascadeModelHandler("captions.internal:50051", top_k=3)
    results = (pipeline
               | beam.Create(urls)
               | beam.Map(lambda url: (url, url))       # keyed by the image URL, as the origin job is
               | CaptionImages(handler))
    results.captions   # (url, PredictionResult(url, Captions[RankedCaption, ...]))
    results.failures   # CaptionFailure(key=url, code="PERMISSION_DENIED", message=..., reason=...)

Where the origin job ran BLIP and CLIP inside the pipeline (two RunInference steps and a
CoGroupByKey), this handler makes one Caption call per image: the server generates the
candidates and ranks them. An example is an image URL (str, fetched by the server), a path, or
the encoded image bytes (as CaptionClient takes them). load_model opens one client (a gRPC
channel) per worker; run_inference sends a batch's images concurrently, each call with the
client's retries (see caption_cascade_client.client).

A failure that remains after the retries is that image's alone: its PredictionResult's inference
is a CaptionFailure instead of the captions, the other images of the batch are answered as usual,
and run_inference does not raise. CaptionImages (or SplitFailures after RunInference) sends the
failures to a second, tagged output, FAILURES.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from .client import (
    NOTEBOOK_PARAMS,
    CaptionClient,
    CaptionError,
    ImageInput,
    ParamsInput,
    RankedCaption,
    RetryPolicy,
    Timings,
    channel_plan,
    generation_params,
)

# Per-call overrides accepted in RunInference(..., inference_args={...}).
INFERENCE_ARGS = frozenset({"top_k", "each_candidate"})

# The tag of the failed images' output of SplitFailures and CaptionImages.
FAILURES = "failures"
CAPTIONS = "captions"


class CaptionFailure(NamedTuple):
    """An image that could not be captioned. key: the element's key (the image URL in the origin
    pipeline), or the image's correlation key when unkeyed. code: gRPC's canonical code name
    ("PERMISSION_DENIED"). message: the server's text. reason: the server's ErrorInfo reason
    (e.g. "DESTINATION_DENIED"), or None."""

    key: str
    code: str
    message: str
    reason: Optional[str] = None


class Captions(list):
    """One image's ranked captions: a list of RankedCaption, most probable first, with the rest of
    the answer: key (the server's correlation key), candidates (generation order), timings."""

    def __init__(self, captions: Iterable[RankedCaption] = (), key: str = "", candidates: Sequence[str] = (),
                 timings: Optional[Timings] = None):
        super().__init__(captions)
        self.key = key
        self.candidates = list(candidates)
        self.timings = timings


class CascadeModelHandler(ModelHandler[ImageInput, PredictionResult, CaptionClient]):
    """RunInference through the Cascade service.

    endpoint, tls_ca, tls, token, token_file, insecure_token, timeout, retry: as CaptionClient
    (timeout per attempt, seconds). top_k: captions per image. each_candidate: list every
    candidate, duplicates included, each with its own probability, as the origin prints them
    (default); False merges identical ones. params: GenerationParams (message or dict); default the
    origin notebook's BLIP settings (sampling, 10 candidates). concurrency: calls in flight per
    worker. min_batch_size, max_batch_size, max_batch_duration_secs: beam.BatchElements settings
    (batch_elements_kwargs).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        tls_ca: Optional[str] = None,
        tls: Optional[bool] = None,
        token: Optional[str] = None,
        token_file: Optional[str] = None,
        insecure_token: bool = False,
        top_k: int = 3,
        each_candidate: bool = True,
        params: ParamsInput = NOTEBOOK_PARAMS,
        timeout: Optional[float] = 120.0,
        retry: RetryPolicy = RetryPolicy(),
        concurrency: int = 8,
        min_batch_size: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        max_batch_duration_secs: Optional[float] = None,
        model_id: Optional[str] = None,
    ):
        # No super().__init__(...) keywords: older Beam releases take none; batching is ours.
        super().__init__()
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self._client_args = dict(tls_ca=tls_ca, tls=tls, token=token, token_file=token_file,
                                 insecure_token=insecure_token, timeout=timeout, retry=retry)
        self._endpoint = endpoint
        self._top_k = top_k
        self._each_candidate = each_candidate
        # Stored serialized: the handler is pickled to the workers.
        message = generation_params(params)
        self._params = message.SerializeToString() if message is not None else None
        self._concurrency = max(1, concurrency)
        self._model_id = model_id or f"caption-cascade@{endpoint}"
        self._batching: Dict[str, Any] = {}
        if min_batch_size is not None:
            self._batching["min_batch_size"] = min_batch_size
        if max_batch_size is not None:
            self._batching["max_batch_size"] = max_batch_size
        if max_batch_duration_secs is not None:
            self._batching["max_batch_duration_secs"] = max_batch_duration_secs
        # A contradiction (a token over plaintext, a bad endpoint) stops the pipeline's
        # construction rather than every worker; files (tls_ca, token_file) are the workers'.
        channel_plan(endpoint, tls_ca=tls_ca, tls=tls, token=bool(token or token_file), insecure_token=insecure_token)

    def load_model(self) -> CaptionClient:
        """One client (channel) per worker; the "model" lives on the server."""
        return CaptionClient(self._endpoint, **self._client_args)

    def _generation_params(self):
        if self._params is None:
            return None
        from ._pb import caption_pb2 as pb

        return pb.GenerationParams.FromString(self._params)

    def run_inference(
        self,
        batch: Sequence[ImageInput],
        model: CaptionClient,
        inference_args: Optional[Dict[str, Any]] = None,
    ) -> Iterable[PredictionResult]:
        args = dict(inference_args or {})
        results = model.caption_many(
            batch,
            concurrency=self._concurrency,
            top_k=int(args.get("top_k", self._top_k)),
            each_candidate=bool(args.get("each_candidate", self._each_candidate)),
            params=self._generation_params(),
            return_errors=True,
        )
        # A list, in batch order: KeyedModelHandler zips it with the batch's keys.
        return [PredictionResult(example, _inference(result), self._model_id) for example, result in zip(batch, results)]

    def validate_inference_args(self, inference_args: Optional[Dict[str, Any]]):
        unknown = set(inference_args or {}) - INFERENCE_ARGS
        if unknown:
            raise ValueError(f"CascadeModelHandler: unknown inference_args {sorted(unknown)}; "
                             f"accepted: {sorted(INFERENCE_ARGS)}")

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching)

    def get_num_bytes(self, batch: Sequence[ImageInput]) -> int:
        return sum(len(x.encode()) if isinstance(x, str) else len(x) if isinstance(x, (bytes, bytearray)) else 0
                   for x in batch)

    def get_metrics_namespace(self) -> str:
        return "CaptionCascade"


def _inference(result) -> Union[Captions, CaptionFailure]:
    if isinstance(result, CaptionError):
        return CaptionFailure(result.key, result.code_name, result.message, result.reason)
    return Captions(result.captions, result.key, result.candidates, result.timings)


class SplitFailures(beam.DoFn):
    """After RunInference(KeyedModelHandler(CascadeModelHandler(...))): (key, PredictionResult)
    with captions goes on unchanged; a failed image goes to the FAILURES output as a
    CaptionFailure keyed by the element's key. Unkeyed PredictionResults work too."""

    def process(self, element):
        key, prediction = element if isinstance(element, tuple) and len(element) == 2 else (None, element)
        inference = prediction.inference
        if isinstance(inference, CaptionFailure):
            yield beam.pvalue.TaggedOutput(FAILURES, inference._replace(key=key) if key is not None else inference)
        else:
            yield element


class CaptionImages(beam.PTransform):
    """(key, image) -> outputs `captions`, (key, PredictionResult), and `failures`, CaptionFailure:
    RunInference with the handler, then SplitFailures. Use as results.captions, results.failures."""

    def __init__(self, handler: CascadeModelHandler, inference_args: Optional[Dict[str, Any]] = None):
        super().__init__()
        self._handler = handler
        self._inference_args = inference_args

    def expand(self, keyed):
        return (
            keyed
            | "RunInference" >> RunInference(KeyedModelHandler(self._handler), inference_args=self._inference_args)
            | "SplitFailures" >> beam.ParDo(SplitFailures()).with_outputs(FAILURES, main=CAPTIONS)
        )


__all__: List[str] = [
    "CAPTIONS",
    "FAILURES",
    "CaptionFailure",
    "CaptionImages",
    "Captions",
    "CascadeModelHandler",
    "SplitFailures",
]

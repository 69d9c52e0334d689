"""An Apache Beam RunInference model handler that captions images with a Cascade server.

    import apache_beam as beam
    from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
    from caption_cascade_client.beam import CascadeModelHandler

    handler = KeyedModelHandler(CascadeModelHandler("captions.internal:50051", top_k=3))
    (pipeline
     | beam.Create(urls)
     | beam.Map(lambda url: (url, url))        # keyed by the image URL, as the origin job is
     | RunInference(handler)                   # -> (url, PredictionResult(url, [RankedCaption]))
     | ...)

Where the origin job ran BLIP and CLIP inside the pipeline (two RunInference steps and a
CoGroupByKey), this handler makes one Caption call per image: the server generates the
candidates and ranks them. An example is an image URL (str, fetched by the server) or the
encoded image bytes; its inference is the list of RankedCaption(text, probability, count), most
probable first. load_model opens one client (a gRPC channel) per worker; run_inference sends a
batch's images concurrently, each call with the client's bounded retries on RESOURCE_EXHAUSTED
and UNAVAILABLE. A failure that remains raises from run_inference, so RunInference's
with_exception_handling() can route the batch to a dead-letter output.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from .client import NOTEBOOK_PARAMS, CaptionClient, ImageInput, ParamsInput, RetryPolicy, generation_params

# Per-call overrides accepted in RunInference(..., inference_args={...}).
INFERENCE_ARGS = frozenset({"top_k", "each_candidate"})


class CascadeModelHandler(ModelHandler[ImageInput, PredictionResult, CaptionClient]):
    """RunInference through the Cascade service.

    target, tls_ca, tls, token, timeout, retry: as CaptionClient (timeout per attempt, seconds).
    top_k: captions per image. each_candidate: list every candidate, duplicates included, each
    with its own probability, as the origin prints them (default); False merges identical ones.
    params: GenerationParams (message or dict); default the origin notebook's BLIP settings
    (sampling, 10 candidates). concurrency: calls in flight per worker. min_batch_size,
    max_batch_size, max_batch_duration_secs: beam.BatchElements settings (batch_elements_kwargs).
    """

    def __init__(
        self,
        target: str,
        *,
        tls_ca: Optional[str] = None,
        tls: Optional[bool] = None,
        token: Optional[str] = None,
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
        self._target = target
        self._tls_ca = tls_ca
        self._tls = tls
        self._token = token
        self._top_k = top_k
        self._each_candidate = each_candidate
        # Stored serialized: the handler is pickled to the workers.
        message = generation_params(params)
        self._params = message.SerializeToString() if message is not None else None
        self._timeout = timeout
        self._retry = retry
        self._concurrency = max(1, concurrency)
        self._model_id = model_id or f"caption-cascade@{target}"
        self._batching: Dict[str, Any] = {}
        if min_batch_size is not None:
            self._batching["min_batch_size"] = min_batch_size
        if max_batch_size is not None:
            self._batching["max_batch_size"] = max_batch_size
        if max_batch_duration_secs is not None:
            self._batching["max_batch_duration_secs"] = max_batch_duration_secs

    def load_model(self) -> CaptionClient:
        """One client (channel) per worker; the "model" lives on the server."""
        return CaptionClient(
            self._target,
            tls_ca=self._tls_ca,
            tls=self._tls,
            token=self._token,
            timeout=self._timeout,
            retry=self._retry,
        )

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
        )
        # A list, in batch order: KeyedModelHandler zips it with the batch's keys.
        return [PredictionResult(example, result.captions, self._model_id) for example, result in zip(batch, results)]

    def validate_inference_args(self, inference_args: Optional[Dict[str, Any]]):
        unknown = set(inference_args or {}) - INFERENCE_ARGS
        if unknown:
            raise ValueError(f"CascadeModelHandler: unknown inference_args {sorted(unknown)}; "
                             f"accepted: {sorted(INFERENCE_ARGS)}")

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return dict(self._batching)

    def get_num_bytes(self, batch: Sequence[ImageInput]) -> int:
        return sum(len(x.encode() if isinstance(x, str) else x) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "CaptionCascade"

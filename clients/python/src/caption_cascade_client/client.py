"""A small client of the Cascade service: one call per image, plain Python results, retries.

    from caption_cascade_client import CaptionClient

    with CaptionClient("localhost:50051") as client:
        result = client.caption("https://example.com/cat.jpg", each_candidate=True)
        for text, probability, count in result.captions:
            print(f"{probability:.2f} {text}")

Retries: a call that fails with RESOURCE_EXHAUSTED (the server is full: --max-inflight, or a
model queue) or UNAVAILABLE (the connection failed, or the server is draining) is tried again
after a jittered exponential backoff, at most RetryPolicy.max_attempts times in all. No other
status is retried: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, DEADLINE_EXCEEDED and the
rest would fail the same way again. A RESOURCE_EXHAUSTED that says a message is over a size limit
is not retried either: a smaller server load will not make the message smaller.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import pathlib
import random
import threading
import time
from typing import Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Union

import grpc

from ._pb import caption_pb2 as pb
from ._pb import caption_pb2_grpc as pb_grpc

ImageInput = Union[str, bytes, bytearray, memoryview]
"""An image: an http(s):// or file:// URL the server fetches, or the encoded image bytes."""

ParamsInput = Union[None, "pb.GenerationParams", Mapping[str, object]]
"""GenerationParams as the message, or as a dict of its fields (e.g. {"preset": "PRESET_NOTEBOOK", "seed": 7})."""


class RankedCaption(NamedTuple):
    """One ranked caption. A tuple, so `text, probability, count = caption` works."""

    text: str
    # Softmax over all generated candidates of CLIP's score (a merged caption sums its copies).
    probability: float
    # How many generated candidates this entry stands for (1 when listing each candidate).
    count: int


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    """The answer for one image."""

    # The image's correlation key: its URL, or "sha256:<hex>" of its bytes.
    key: str
    # The best top_k captions, most probable first.
    captions: List[RankedCaption]
    # Every generated candidate, in generation order.
    candidates: List[str]


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with "full jitter" exponential backoff.

    Attempt n (n = 1 after the first failure) waits uniform(0, min(max_backoff_s,
    initial_backoff_s * multiplier ** (n - 1))) seconds.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable: frozenset = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def should_retry(self, error: grpc.RpcError) -> bool:
        code = error.code() if hasattr(error, "code") else None
        if code not in self.retryable:
            return False
        details = (error.details() or "") if hasattr(error, "details") else ""
        # Over a message size limit (the server's --max-message-bytes, or this channel's receive
        # limit): the same message fails the same way however often it is sent.
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and ("limit of" in details or "larger than max" in details):
            return False
        return True

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(0, cap)


RetryHook = Callable[[int, grpc.RpcError, float], None]
"""Called as hook(retry_number, error, delay_s) before each retry's wait."""


def generation_params(params: ParamsInput) -> Optional["pb.GenerationParams"]:
    """A GenerationParams message from a message, a dict of its fields, or None."""
    if params is None or isinstance(params, pb.GenerationParams):
        return params
    if isinstance(params, Mapping):
        from google.protobuf import json_format

        return json_format.ParseDict(dict(params), pb.GenerationParams())
    raise TypeError(f"params: expected GenerationParams, a dict or None, not {type(params).__name__}")


NOTEBOOK_PARAMS = pb.GenerationParams(preset=pb.PRESET_NOTEBOOK)
"""The origin notebook's BLIP settings: sampling, top_p 0.9, top_k 50, 10 candidates, ..."""


def _image(image: ImageInput) -> "pb.Image":
    if isinstance(image, str):
        return pb.Image(url=image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(image))
    if isinstance(image, pb.Image):
        return image
    raise TypeError(f"image: expected a URL (str) or encoded bytes, not {type(image).__name__}")


def _read(pem: Union[None, str, bytes, pathlib.Path]) -> Optional[bytes]:
    if pem is None or isinstance(pem, bytes):
        return pem
    return pathlib.Path(pem).read_bytes()


class CaptionClient:
    """A channel to one Cascade server; thread-safe (share one per process).

    target: "host:port". tls_ca: the CA certificate (a path, or PEM bytes) that signed the
    server's certificate; with it the channel is TLS. tls=True with no tls_ca uses the system's
    roots. token: a bearer token sent as `authorization: Bearer <token>` on every call; over TLS,
    or, without TLS, only to a loopback target (gRPC refuses to send tokens in plaintext over a
    network). timeout: seconds each attempt may take (its gRPC deadline); None for no deadline.
    """

    def __init__(
        self,
        target: str,
        *,
        tls_ca: Union[None, str, bytes, pathlib.Path] = None,
        tls: Optional[bool] = None,
        token: Optional[str] = None,
        timeout: Optional[float] = None,
        retry: RetryPolicy = RetryPolicy(),
        on_retry: Optional[RetryHook] = None,
        options: Sequence[tuple] = (),
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry
        self.on_retry = on_retry
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._retries = 0
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_size = 0
        # Images can be large; the server enforces its own --max-message-bytes.
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 64 << 20), *options]
        if tls_ca is not None or tls:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca))
            if token:
                creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
            self._channel = grpc.secure_channel(target, creds, options=options)
        elif token:
            local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
            creds = grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(token))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.CascadeStub(self._channel)

    @property
    def retries(self) -> int:
        """How many retries this client has made, over all calls."""
        with self._lock:
            return self._retries

    def caption(
        self,
        image: ImageInput,
        *,
        top_k: int = 3,
        each_candidate: bool = False,
        params: ParamsInput = None,
    ) -> CaptionResult:
        """Captions one image (a URL or encoded bytes); raises grpc.RpcError on failure.

        each_candidate=True lists every generated candidate, duplicates included, each with its
        own probability, as the origin job prints them; False merges identical candidates.
        params: GenerationParams (None: the server defaults; NOTEBOOK_PARAMS: the origin's).
        """
        request = pb.CaptionRequest(
            image=_image(image), params=generation_params(params), top_k=top_k, each_candidate=each_candidate
        )
        response = self._call(self._stub.Caption, request)
        return CaptionResult(
            key=response.key,
            captions=[RankedCaption(c.text, c.probability, c.count) for c in response.captions],
            candidates=list(response.candidates),
        )

    def caption_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 8,
        top_k: int = 3,
        each_candidate: bool = False,
        params: ParamsInput = None,
    ) -> List[CaptionResult]:
        """Captions many images, up to `concurrency` calls at once; results in input order.

        Each call retries on its own. If any image fails (after its retries), the calls not yet
        started are cancelled and the first failure in input order is raised.
        """
        images = list(images)
        params = generation_params(params)
        if concurrency <= 1 or len(images) <= 1:
            return [self.caption(i, top_k=top_k, each_candidate=each_candidate, params=params) for i in images]
        pool = self._executor(concurrency)
        futures = [
            pool.submit(self.caption, i, top_k=top_k, each_candidate=each_candidate, params=params) for i in images
        ]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()

    def _executor(self, concurrency: int) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_size < concurrency:
                # A bigger pool replaces the old one, whose running calls finish undisturbed.
                old, self._pool, self._pool_size = self._pool, concurrent.futures.ThreadPoolExecutor(
                    max_workers=concurrency, thread_name_prefix="caption-cascade"
                ), concurrency
                if old is not None:
                    old.shutdown(wait=False)
            return self._pool

    def _call(self, method, request):
        attempt = 1
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                if attempt >= self.retry.max_attempts or not self.retry.should_retry(error):
                    raise
                with self._lock:
                    self._retries += 1
                    delay = self.retry.backoff_s(attempt, self._rng)
                if self.on_retry is not None:
                    self.on_retry(attempt, error, delay)
                time.sleep(delay)
                attempt += 1

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._channel.close()

    def __enter__(self) -> "CaptionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

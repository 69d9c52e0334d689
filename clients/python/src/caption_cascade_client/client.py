"""A small client of the caption-cascade services: one call per image, plain Python results, retries.

    from caption_cascade_client import CaptionClient

    with CaptionClient("localhost:50051") as client:
        result = client.caption("photos/cat.jpg")          # a path: the file's bytes are sent
        for c in result.captions:
            print(f"{c.probability:.2f} {c.cosine:.3f} {c.text}")

An image is a URL the server fetches (a str with a scheme: http://, https://, file://), a local
file (a str naming an existing file, or a pathlib.Path: the client reads it and sends its bytes),
the encoded bytes themselves, or a binary file object (open(..., "rb"), io.BytesIO).

Retries are decided from the status code and the details the server attaches to it
(google.rpc.ErrorInfo and google.rpc.RetryInfo in grpc-status-details-bin), never from message
text. UNAVAILABLE (the connection failed, or the server is draining) is retried. RESOURCE_EXHAUSTED
is retried only when the server sent a RetryInfo (a full server or queue: --max-inflight,
--max-queue-size, --max-open-streams), waiting at least its delay; without one (a message over a
size limit, here or on the server) the same request would fail the same way. No other code is
retried. Attempts are bounded (RetryPolicy.max_attempts) with jittered exponential backoff.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import ipaddress
import os
import pathlib
import random
import re
import threading
import time
from typing import Callable, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import grpc
from google.rpc import error_details_pb2, status_pb2

from ._pb import caption_pb2 as pb
from ._pb import caption_pb2_grpc as pb_grpc

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, "pb.Image", object]
"""An image: a URL with a scheme (str), a path (str of an existing file, or pathlib.Path), encoded
bytes, or a binary file object (anything with read() returning bytes)."""

ParamsInput = Union[None, "pb.GenerationParams", Mapping[str, object]]
"""GenerationParams as the message, or as a dict of its fields (e.g. {"preset": "PRESET_NOTEBOOK", "seed": 7})."""

# A URL starts with a scheme and "://"; anything else given as a str must be an existing file.
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class RankedCaption(NamedTuple):
    """One ranked caption (RankedCaption in caption.proto); fields by name: c.text, c.cosine."""

    text: str
    # Caption: softmax over all generated candidates of CLIP's score (a merged caption sums its
    # copies). Rank: softmax over the request's captions.
    probability: float
    # Caption: how many generated candidates this entry stands for (1 when listing each
    # candidate). Rank: 0.
    count: int
    # Cosine similarity of the image and caption embeddings.
    cosine: float
    # CLIP's logit: exp(logit_scale) * cosine.
    logit: float
    # Position among the distinct candidates (Caption), among all candidates in generation order
    # (Caption with each_candidate), or in the request (Rank).
    index: int


@dataclasses.dataclass(frozen=True)
class Timings:
    """Time spent in each stage of a call, in milliseconds (server side)."""

    fetch_ms: float
    preprocess_ms: float
    generate_ms: float
    rank_ms: float
    total_ms: float


@dataclasses.dataclass(frozen=True)
class CaptionResult:
    """The answer for one image (CaptionResponse)."""

    # The image's correlation key: its URL, or "sha256:<hex>" of its bytes.
    key: str
    # The best top_k captions, most probable first.
    captions: List[RankedCaption]
    # Every generated candidate, in generation order.
    candidates: List[str]
    timings: Timings


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One generated candidate (Generate): its text and token ids (start and end token included)."""

    text: str
    token_ids: List[int]


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """The answer of Generate: candidates in generation order."""

    key: str
    candidates: List[Candidate]
    timings: Timings


@dataclasses.dataclass(frozen=True)
class RankResult:
    """The answer of Rank: every caption, most probable first."""

    key: str
    captions: List[RankedCaption]
    timings: Timings


@dataclasses.dataclass(frozen=True)
class StatusDetails:
    """What the server said about a failure besides code and message (google.rpc.ErrorInfo,
    google.rpc.RetryInfo). reason: e.g. "SERVER_BUSY", "MESSAGE_TOO_LARGE" (the API documents
    them); metadata: e.g. {"flag": "--max-inflight"}; retry_delay_s: set only when the same
    request may succeed later, the least the server asks to wait."""

    reason: Optional[str] = None
    domain: Optional[str] = None
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retry_delay_s: Optional[float] = None


def status_details(error: grpc.RpcError) -> Optional[StatusDetails]:
    """The structured details of a failed call, or None when the server sent none (or they do not
    belong to this status)."""
    if isinstance(error, CaptionError):
        return error.status_details
    try:
        trailers = error.trailing_metadata() or ()
    except Exception:  # an RpcError that is not a call (e.g. raised by a test double)
        return None
    raw = next((v for k, v in trailers if k == STATUS_DETAILS_KEY), None)
    if raw is None:
        return None
    try:
        status = status_pb2.Status.FromString(raw)
    except Exception:
        return None
    if status.code != error.code().value[0]:
        return None
    details = StatusDetails()
    for any_detail in status.details:
        if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            any_detail.Unpack(info)
            details = dataclasses.replace(details, reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_detail.Unpack(info)
            delay = info.retry_delay.seconds + info.retry_delay.nanos / 1e9
            details = dataclasses.replace(details, retry_delay_s=max(0.0, delay))
    return details


class CaptionError(grpc.RpcError):
    """A failed call about one image: a grpc.RpcError (code(), details() work as on any), with the
    image's key and the server's structured details.

    key: the image's correlation key (its URL, or "sha256:<hex>" of its bytes). code: the
    grpc.StatusCode; code_name: its canonical name ("PERMISSION_DENIED"). message: the server's
    text. status_details: StatusDetails or None; reason: its ErrorInfo reason, or None.
    """

    def __init__(self, key: str, code: grpc.StatusCode, message: str, status_details: Optional[StatusDetails] = None):
        super().__init__(f"{code.name}: {message}")
        self.key = key
        self._code = code
        self.message = message
        self.status_details = status_details

    @classmethod
    def of(cls, key: str, error: grpc.RpcError) -> "CaptionError":
        if isinstance(error, CaptionError):
            return error
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        message = (error.details() if hasattr(error, "details") else None) or str(error)
        return cls(key, code, message, status_details(error))

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self.message

    @property
    def code_name(self) -> str:
        return self._code.name

    @property
    def reason(self) -> Optional[str]:
        return self.status_details.reason if self.status_details else None

    def __reduce__(self):
        # Picklable (Beam moves failures between workers).
        return (CaptionError, (self.key, self._code, self.message, self.status_details))


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with "full jitter" exponential backoff.

    retryable: codes retried whatever the details (UNAVAILABLE: the connection failed or the
    server is draining). retryable_when_told: codes retried only when the server's details carry
    a RetryInfo (RESOURCE_EXHAUSTED: a full server is worth retrying, an oversize message is not).
    Retry n (1-based) waits the server's retry delay, if any, plus uniform(0, min(max_backoff_s,
    initial_backoff_s * multiplier ** (n - 1))) seconds.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    retryable: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})
    retryable_when_told: frozenset = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def should_retry(self, error: grpc.RpcError) -> bool:
        code = error.code() if hasattr(error, "code") else None
        if code in self.retryable:
            return True
        if code in self.retryable_when_told:
            details = status_details(error)
            return details is not None and details.retry_delay_s is not None
        return False

    def backoff_s(self, retry: int, rng: random.Random) -> float:
        """The jittered part of the wait before retry number `retry` (1-based)."""
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return rng.uniform(0, cap)

    def delay_s(self, retry: int, error: grpc.RpcError, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry`: the server's delay plus the backoff."""
        details = status_details(error)
        told = details.retry_delay_s if details is not None and details.retry_delay_s is not None else 0.0
        return told + self.backoff_s(retry, rng)


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


def image_message(image: ImageInput) -> "pb.Image":
    """The Image message for a URL, a path, bytes or a binary file object (see ImageInput)."""
    if isinstance(image, pb.Image):
        return image
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pb.Image(data=bytes(image))
    if isinstance(image, str):
        if _SCHEME.match(image):
            return pb.Image(url=image)
        if os.path.isfile(image):
            return pb.Image(data=pathlib.Path(image).read_bytes())
        raise ValueError(
            f"image {image!r} is neither a URL with a scheme (http://, https://, file://: the server "
            "fetches it) nor an existing file (the client reads it and sends its bytes)"
        )
    if isinstance(image, os.PathLike):
        return pb.Image(data=pathlib.Path(image).read_bytes())
    read = getattr(image, "read", None)
    if callable(read):
        data = read()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError("image: the file object gave text; open the file in binary mode ('rb')")
        return pb.Image(data=bytes(data))
    raise TypeError(
        "image: expected a URL or a path (str), a pathlib.Path, bytes or a binary file object, "
        f"not {type(image).__name__}"
    )


def image_key(image: "pb.Image") -> str:
    """The correlation key the server gives this image: its URL, or "sha256:<hex>" of its bytes."""
    if image.WhichOneof("source") == "url":
        return image.url
    return "sha256:" + hashlib.sha256(image.data).hexdigest()


def parse_endpoint(endpoint: str) -> Tuple[str, Optional[bool]]:
    """(host:port, TLS or not) of "host:port", "http://host:port" or "https://host:port".

    The scheme says whether the channel is TLS (https) or plaintext (http); a bare host:port
    leaves it to the other arguments (None). A URL without a port takes 443 (https) or 80 (http).
    """
    match = re.match(r"^(https?)://([^/]+)/?$", endpoint)
    if match:
        scheme, authority = match.groups()
        if not re.search(r":\d+$", authority):
            authority += ":443" if scheme == "https" else ":80"
        return authority, scheme == "https"
    if "://" in endpoint or "/" in endpoint.split(":", 1)[0]:
        raise ValueError(f"endpoint {endpoint!r}: expected host:port, http://host:port or https://host:port")
    return endpoint, None


def channel_plan(endpoint: str, *, tls_ca=None, tls: Optional[bool] = None, token: bool = False,
                 insecure_token: bool = False) -> Tuple[str, bool]:
    """(host:port, TLS or not) for CaptionClient's arguments; ValueError for a contradiction, or
    for a token that would cross the network in plaintext without insecure_token."""
    target, scheme_tls = parse_endpoint(endpoint)
    if scheme_tls is False and (tls or tls_ca is not None):
        raise ValueError(f"endpoint {endpoint!r} says plaintext (http://) but TLS was asked for")
    use_tls = bool(tls or tls_ca is not None or scheme_tls)
    if token and not use_tls and not insecure_token and not _is_loopback(target):
        raise ValueError(
            f"a bearer token over plaintext to {target} would cross the network in the clear: use TLS "
            "(an https:// endpoint, or tls_ca=), or pass insecure_token=True for in-cluster traffic"
        )
    return target, use_tls


def _is_loopback(target: str) -> bool:
    if target.startswith("unix:"):
        return True
    host = target.rsplit(":", 1)[0] if re.search(r":\d+$", target) else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(pem: Union[None, str, bytes, pathlib.Path]) -> Optional[bytes]:
    if pem is None or isinstance(pem, bytes):
        return pem
    return pathlib.Path(pem).read_bytes()


class _Token:
    """A bearer token, given as is or read from a file (read again when the file changes, so a
    rotated token is picked up without a new client)."""

    def __init__(self, token: Optional[str], token_file: Union[None, str, os.PathLike]):
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        self._token = token
        self._file = pathlib.Path(token_file) if token_file is not None else None
        self._lock = threading.Lock()
        self._stamp: Optional[Tuple[int, int]] = None
        if self._file is not None:
            self.value()  # a missing or empty file fails here, not on the first call

    def __bool__(self) -> bool:
        return bool(self._token) or self._file is not None

    def value(self) -> str:
        if self._file is None:
            return self._token or ""
        with self._lock:
            st = self._file.stat()
            if self._stamp != (st.st_mtime_ns, st.st_size):
                token = self._file.read_text().strip()
                if not token:
                    raise ValueError(f"token_file {self._file} is empty")
                self._token, self._stamp = token, (st.st_mtime_ns, st.st_size)
            return self._token

    def metadata(self) -> Tuple[Tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.value()}"),)


class _TokenPlugin(grpc.AuthMetadataPlugin):
    def __init__(self, token: _Token):
        self._token = token

    def __call__(self, context, callback):
        try:
            callback(self._token.metadata(), None)
        except Exception as e:  # reported as the call's failure
            callback((), e)


class _CallDetails(
    NamedTuple("_CallDetails", [("method", str), ("timeout", Optional[float]), ("metadata", object),
                                ("credentials", object), ("wait_for_ready", object), ("compression", object)]),
    grpc.ClientCallDetails,
):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the bearer token on a plaintext channel, where gRPC's call credentials are refused."""

    def __init__(self, token: _Token):
        self._token = token

    def _details(self, details):
        metadata = list(details.metadata or ()) + list(self._token.metadata())
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


class CaptionClient:
    """A channel to one caption-cascade server; thread-safe (share one per process).

    endpoint: "host:port", "http://host:port" (plaintext) or "https://host:port" (TLS with the
    system's roots, or tls_ca). tls_ca: the CA certificate (a path, or PEM bytes) that signed the
    server's certificate; with it the channel is TLS. tls=True with no tls_ca uses the system's
    roots.

    token (the token itself) or token_file (a file holding it, read again when it changes): a
    bearer token sent as `authorization: Bearer <token>` on every call. Over TLS it always is.
    Over plaintext it is sent to a loopback endpoint only, unless insecure_token=True: for
    in-cluster traffic between pods, where the network is trusted and TLS is not set up; anyone
    who can see that traffic can read the token.

    timeout: seconds each attempt may take (its gRPC deadline); None for no deadline.
    retry: RetryPolicy; on_retry: RetryHook; options: extra gRPC channel options.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        tls_ca: Union[None, str, bytes, pathlib.Path] = None,
        tls: Optional[bool] = None,
        token: Optional[str] = None,
        token_file: Union[None, str, os.PathLike] = None,
        insecure_token: bool = False,
        timeout: Optional[float] = None,
        retry: RetryPolicy = RetryPolicy(),
        on_retry: Optional[RetryHook] = None,
        options: Sequence[tuple] = (),
    ):
        credential = _Token(token, token_file)
        target, use_tls = channel_plan(endpoint, tls_ca=tls_ca, tls=tls, token=bool(credential),
                                       insecure_token=insecure_token)
        self.endpoint = endpoint
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
        if use_tls:
            creds = grpc.ssl_channel_credentials(root_certificates=_read(tls_ca))
            if credential:
                creds = grpc.composite_channel_credentials(creds, grpc.metadata_call_credentials(_TokenPlugin(credential)))
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
            if credential:
                self._channel = grpc.intercept_channel(self._channel, _TokenInterceptor(credential))
        self._cascade = pb_grpc.CascadeStub(self._channel)
        self._generator = pb_grpc.GeneratorStub(self._channel)
        self._ranker = pb_grpc.RankerStub(self._channel)

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
        """Captions one image (Cascade.Caption); raises CaptionError (a grpc.RpcError) on failure.

        each_candidate=True lists every generated candidate, duplicates included, each with its
        own probability, as the origin job prints them; False merges identical candidates.
        params: GenerationParams (None: the server defaults; NOTEBOOK_PARAMS: the origin's).
        """
        message = image_message(image)
        request = pb.CaptionRequest(
            image=message, params=generation_params(params), top_k=top_k, each_candidate=each_candidate
        )
        response = self._call(self._cascade.Caption, request, message)
        return CaptionResult(
            key=response.key,
            captions=[_ranked(c) for c in response.captions],
            candidates=list(response.candidates),
            timings=_timings(response.timings),
        )

    def generate(self, image: ImageInput, *, params: ParamsInput = None) -> GenerateResult:
        """Writes candidate captions for one image (Generator.Generate)."""
        message = image_message(image)
        request = pb.GenerateRequest(image=message, params=generation_params(params))
        response = self._call(self._generator.Generate, request, message)
        return GenerateResult(
            key=response.key,
            candidates=[Candidate(c.text, list(c.token_ids)) for c in response.candidates],
            timings=_timings(response.timings),
        )

    def rank(self, image: ImageInput, captions: Sequence[str]) -> RankResult:
        """Scores captions against one image (Ranker.Rank); all of them, most probable first."""
        message = image_message(image)
        response = self._call(self._ranker.Rank, pb.RankRequest(image=message, captions=list(captions)), message)
        return RankResult(
            key=response.key, captions=[_ranked(c) for c in response.captions], timings=_timings(response.timings)
        )

    def caption_many(
        self,
        images: Iterable[ImageInput],
        *,
        concurrency: int = 8,
        top_k: int = 3,
        each_candidate: bool = False,
        params: ParamsInput = None,
        return_errors: bool = False,
    ) -> List[Union[CaptionResult, CaptionError]]:
        """Captions many images, up to `concurrency` calls at once; results in input order.

        Each call retries on its own. return_errors=True: a failed image's place holds its
        CaptionError and the others are captioned all the same. False: the first failure in input
        order is raised, and calls not yet started are cancelled.
        """
        images = list(images)
        params = generation_params(params)

        def one(image):
            try:
                return self.caption(image, top_k=top_k, each_candidate=each_candidate, params=params)
            except CaptionError as e:
                if return_errors:
                    return e
                raise
            except (ValueError, TypeError, OSError) as e:
                # What the client refused before any call (no such file, not a URL...).
                if return_errors:
                    key = image if isinstance(image, str) else str(getattr(image, "name", "") or repr(image)[:80])
                    return CaptionError(key, grpc.StatusCode.INVALID_ARGUMENT, str(e))
                raise

        if concurrency <= 1 or len(images) <= 1:
            return [one(i) for i in images]
        pool = self._executor(concurrency)
        futures = [pool.submit(one, i) for i in images]
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

    def _call(self, method, request, image: "pb.Image"):
        attempt = 1
        while True:
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                if attempt >= self.retry.max_attempts or not self.retry.should_retry(error):
                    raise CaptionError.of(image_key(image), error) from error
                with self._lock:
                    self._retries += 1
                    delay = self.retry.delay_s(attempt, error, self._rng)
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


def _ranked(c) -> RankedCaption:
    return RankedCaption(c.text, c.probability, c.count, c.cosine, c.logit, c.index)


def _timings(t) -> Timings:
    return Timings(t.fetch_ms, t.preprocess_ms, t.generate_ms, t.rank_ms, t.total_ms)


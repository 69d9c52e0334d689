"""Python client of the caption-cascade gRPC service (BLIP writes candidate captions, CLIP ranks
them), and an Apache Beam RunInference model handler for it (caption_cascade_client.beam, which
needs apache-beam: `pip install caption-cascade-client[beam]`).

The generated stubs are caption_cascade_client.pb (messages) and caption_cascade_client.pb_grpc.
"""

from ._pb import caption_pb2 as pb
from ._pb import caption_pb2_grpc as pb_grpc
from .client import (
    NOTEBOOK_PARAMS,
    Candidate,
    CaptionClient,
    CaptionError,
    CaptionResult,
    GenerateResult,
    RankedCaption,
    RankResult,
    RetryPolicy,
    StatusDetails,
    Timings,
    generation_params,
    image_message,
    status_details,
)

__all__ = [
    "NOTEBOOK_PARAMS",
    "Candidate",
    "CaptionClient",
    "CaptionError",
    "CaptionResult",
    "GenerateResult",
    "RankedCaption",
    "RankResult",
    "RetryPolicy",
    "StatusDetails",
    "Timings",
    "generation_params",
    "image_message",
    "status_details",
    "pb",
    "pb_grpc",
]

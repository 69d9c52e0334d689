"""A caller written by others: Python stubs generated from proto/ with grpcio-tools, then every
service called as another microservice would. Prints one JSON object with what it saw.

Usage: python_client.py HOST:PORT IMAGE_FILE
"""

import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def stubs():
    out = tempfile.mkdtemp(prefix="caption-stubs-")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"--python_out={out}", f"--grpc_python_out={out}",
            "caption/v1/caption.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on proto/caption/v1/caption.proto")
    sys.path.insert(0, out)
    from caption.v1 import caption_pb2, caption_pb2_grpc  # noqa: E402  (generated just above)
    return caption_pb2, caption_pb2_grpc


def main():
    addr, image_path = sys.argv[1], sys.argv[2]
    pb, rpc = stubs()
    channel = grpc.insecure_channel(addr)
    grpc.channel_ready_future(channel).result(timeout=60)
    image = pb.Image(data=pathlib.Path(image_path).read_bytes())
    seen = {}

    caption = rpc.CascadeStub(channel).Caption(
        pb.CaptionRequest(image=image, params=pb.GenerationParams(seed=1, decoding=pb.DECODING_GREEDY), top_k=3))
    seen["caption"] = [{"text": c.text, "probability": c.probability} for c in caption.captions]
    seen["key"] = caption.key

    generated = rpc.GeneratorStub(channel).Generate(
        pb.GenerateRequest(image=image, params=pb.GenerationParams(num_candidates=4, seed=2)))
    seen["candidates"] = [c.text for c in generated.candidates]

    ranked = rpc.RankerStub(channel).Rank(
        pb.RankRequest(image=image, captions=[seen["caption"][0]["text"], "a small red square on a black background"]))
    seen["rank"] = [{"text": c.text, "probability": c.probability, "index": c.index} for c in ranked.captions]

    try:
        rpc.CascadeStub(channel).Caption(pb.CaptionRequest(image=pb.Image(data=b"not an image")))
    except grpc.RpcError as e:
        seen["bad_image"] = {"code": e.code().name, "details": e.details()}

    try:
        rpc.GeneratorStub(channel).Generate(
            pb.GenerateRequest(image=image, params=pb.GenerationParams(top_p=2.0)))
    except grpc.RpcError as e:
        seen["bad_param"] = {"code": e.code().name, "details": e.details()}

    print(json.dumps(seen))


if __name__ == "__main__":
    main()

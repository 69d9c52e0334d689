"""A caller written by others: Python stubs generated from proto/ with grpcio-tools, then every
service called as another microservice would. Prints one JSON object with what it saw.

Usage: python_client.py HOST:PORT IMAGE_FILE [--tls-ca CA_PEM] [--token TOKEN]
With --tls-ca the channel is TLS (verified against that CA), and with --token every call carries
it as a bearer token; a call without the token is tried too and its status recorded.
"""

import argparse
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def stubs():
    out = tempfile.mkdtemp(prefix="caption-stubs-")
    # Only our file is generated: google.rpc.Status, which it imports, comes from
    # googleapis-common-protos, and google/protobuf/any.proto from grpcio-tools' own protos.
    well_known = pathlib.Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", "caption/v1/caption.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on proto/caption/v1/caption.proto")
    sys.path.insert(0, out)
    from caption.v1 import caption_pb2, caption_pb2_grpc  # noqa: E402  (generated just above)
    return caption_pb2, caption_pb2_grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("image")
    parser.add_argument("--tls-ca")
    parser.add_argument("--token")
    args = parser.parse_args()
    pb, rpc = stubs()
    image = pb.Image(data=pathlib.Path(args.image).read_bytes())
    seen = {}
    if args.tls_ca:
        tls = grpc.ssl_channel_credentials(root_certificates=pathlib.Path(args.tls_ca).read_bytes())
        if args.token:
            without = grpc.secure_channel(args.addr, tls)
            grpc.channel_ready_future(without).result(timeout=60)
            try:
                rpc.CascadeStub(without).Caption(pb.CaptionRequest(image=image))
                seen["no_token"] = {"code": "OK"}
            except grpc.RpcError as e:
                seen["no_token"] = {"code": e.code().name, "details": e.details()}
            tls = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(args.token))
        channel = grpc.secure_channel(args.addr, tls)
    else:
        channel = grpc.insecure_channel(args.addr)
    grpc.channel_ready_future(channel).result(timeout=60)

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

"""Build hook: generates the gRPC stubs, then derives the runtime requirements from them.

The stubs come from ../../proto (the repository's API) when building from a checkout; an sdist
carries the stubs it was built with instead. Generated code checks at import that the installed
grpcio and protobuf are at least the versions that generated it, so those are the lower bounds.
"""

import pathlib
import re
import sys

from setuptools import setup

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import generate  # noqa: E402  (clients/python/generate.py, beside this file)

if (generate.DEFAULT_PROTO_ROOT / generate.PROTO).is_file():
    generate.generate(generate.DEFAULT_PROTO_ROOT, generate.DEFAULT_OUT)
elif not (generate.DEFAULT_OUT / "caption_pb2.py").is_file():
    sys.exit(f"no {generate.PROTO} under {generate.DEFAULT_PROTO_ROOT} and no generated stubs to package")

pb2 = (generate.DEFAULT_OUT / "caption_pb2.py").read_text()
grpc_stub = (generate.DEFAULT_OUT / "caption_pb2_grpc.py").read_text()
protobuf = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2)
grpcio = re.search(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_stub, re.MULTILINE)
if not protobuf or not grpcio:
    sys.exit("setup.py: cannot read the generator versions from the stubs; update the patterns")

setup(
    install_requires=[
        f"grpcio>={grpcio.group(1)}",
        f"protobuf>={'.'.join(protobuf.groups())}",
        # google.rpc.status_pb2, imported by caption_pb2 (CaptionStream's per-image error).
        "googleapis-common-protos>=1.56",
    ]
)

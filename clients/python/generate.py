"""Generates the gRPC stubs of proto/caption/v1/caption.proto into the package.

    python clients/python/generate.py [--proto-root DIR] [--out DIR] [--check]

Writes caption_pb2.py, caption_pb2.pyi and caption_pb2_grpc.py into
src/caption_cascade_client/_pb/ (git-ignored: the stubs are build output, never committed).
The package's build (setup.py) runs this too, so `pip install clients/python` works from a
checkout without running it first.

Only caption.proto is compiled, with `-I <repo>/proto` so its `import "google/rpc/status.proto"`
resolves. The generated caption_pb2 then imports `google.rpc.status_pb2` at run time, which the
googleapis-common-protos package provides (a dependency): generating our own google/rpc module
would clash with that package, which apache-beam and most Google client libraries install.

protoc writes the gRPC module with an absolute import of its message module
(`from caption.v1 import caption_pb2`), which only works with the output directory on sys.path;
it is rewritten to a relative import so the stubs live inside this package. --check regenerates
into a temporary directory and fails if the package's stubs differ (stale after a proto change).
"""

import argparse
import filecmp
import pathlib
import re
import shutil
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_PROTO_ROOT = HERE.parents[1] / "proto"
DEFAULT_OUT = HERE / "src" / "caption_cascade_client" / "_pb"
PROTO = "caption/v1/caption.proto"
GENERATED = ("caption_pb2.py", "caption_pb2.pyi", "caption_pb2_grpc.py")
ABSOLUTE_IMPORT = re.compile(r"^from caption\.v1 import caption_pb2 as ", re.MULTILINE)


def generate(proto_root: pathlib.Path, out: pathlib.Path) -> None:
    """Compiles PROTO under proto_root and writes the package's stub modules into out."""
    import grpc_tools  # build-time dependency only
    from grpc_tools import protoc

    # The well-known types (google/protobuf/any.proto, which status.proto imports) ship with
    # grpcio-tools; `python -m grpc_tools.protoc` adds them itself, protoc.main does not.
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    if not (proto_root / PROTO).is_file():
        raise SystemExit(f"generate.py: {proto_root / PROTO} not found (pass --proto-root)")
    with tempfile.TemporaryDirectory(prefix="caption-stubs-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{proto_root}",
            f"-I{well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"generate.py: protoc failed on {proto_root / PROTO}")
        produced = pathlib.Path(tmp) / "caption" / "v1"
        grpc_module = produced / "caption_pb2_grpc.py"
        text, n = ABSOLUTE_IMPORT.subn("from . import caption_pb2 as ", grpc_module.read_text())
        if n != 1:
            raise SystemExit("generate.py: protoc's import of caption_pb2 in caption_pb2_grpc.py changed form; "
                             "update ABSOLUTE_IMPORT")
        grpc_module.write_text(text)
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text('"""Stubs generated from proto/caption/v1/caption.proto by generate.py."""\n')
        for name in GENERATED:
            shutil.copyfile(produced / name, out / name)


def check(proto_root: pathlib.Path, out: pathlib.Path) -> bool:
    """True when the stubs in out are what generate() writes now."""
    with tempfile.TemporaryDirectory(prefix="caption-stubs-check-") as tmp:
        generate(proto_root, pathlib.Path(tmp))
        return all((out / n).is_file() and filecmp.cmp(pathlib.Path(tmp) / n, out / n, shallow=False)
                   for n in GENERATED)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proto-root", type=pathlib.Path, default=DEFAULT_PROTO_ROOT)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="fail if the stubs in --out are stale")
    args = parser.parse_args()
    if args.check:
        if not check(args.proto_root, args.out):
            sys.exit(f"stubs in {args.out} differ from {args.proto_root / PROTO}: run generate.py")
        return
    generate(args.proto_root, args.out)


if __name__ == "__main__":
    main()

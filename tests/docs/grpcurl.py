"""grpcurl's stand-in for the docs test: the documented grpcurl commands, checked and sent.

grpcurl itself is not installable here. This takes the command line the documentation gives
(`-plaintext`, `-d JSON`, `-H 'name: value'`, `-max-time S`, then `HOST:PORT` and `list`,
`describe SYMBOL` or `SERVICE/METHOD`), reads the schema through the server's reflection as grpcurl
does (no proto file), parses `-d` as protobuf JSON into the reflected request message (unknown fields
are an error, as in grpcurl), sends it with grpcio and prints the answer as JSON. A method the server
does not reflect, JSON that does not fit the message, or an error status fails with grpcurl's exit
status and a message.
"""

from __future__ import annotations

import sys

import grpc
import reflection_pb2 as rpb
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory


def fail(message: str, code: int = 1) -> None:
    print(f"Failed: {message}", file=sys.stderr)
    sys.exit(code)


def parse(argv: list[str]) -> tuple[dict, list[str]]:
    opts: dict = {"headers": []}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "-plaintext":
            opts["plaintext"] = True
        elif arg in ("-d", "-H", "-max-time", "-rpc-header", "-reflect-header"):
            if i + 1 == len(argv):
                fail(f"{arg} needs a value")
            i += 1
            key = {"-d": "data", "-max-time": "max_time"}.get(arg, "headers")
            if key == "headers":
                opts["headers"].append(argv[i])
            else:
                opts[key] = argv[i]
        elif arg.startswith("-"):
            fail(f"the stand-in does not know the flag {arg} (add it to tests/docs/grpcurl.py)")
        else:
            rest.append(arg)
        i += 1
    if not opts.get("plaintext"):
        fail("the documented calls are plaintext (-plaintext); TLS is not checked by the stand-in")
    return opts, rest


class Reflection:
    def __init__(self, channel: grpc.Channel, metadata):
        self.call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=rpb.ServerReflectionRequest.SerializeToString,
            response_deserializer=rpb.ServerReflectionResponse.FromString,
        )
        self.metadata = metadata
        self.pool = descriptor_pool.DescriptorPool()
        self.added: set[str] = set()

    def ask(self, **request) -> rpb.ServerReflectionResponse:
        answers = list(self.call(iter([rpb.ServerReflectionRequest(**request)]), metadata=self.metadata, timeout=10))
        if not answers:
            fail("reflection gave no answer")
        if answers[0].HasField("error_response"):
            fail(f"reflection: {answers[0].error_response.error_message}")
        return answers[0]

    def services(self) -> list[str]:
        return sorted(s.name for s in self.ask(list_services="").list_services_response.service)

    def load(self, symbol: str) -> None:
        files = self.ask(file_containing_symbol=symbol).file_descriptor_response.file_descriptor_proto
        protos = {}
        for raw in files:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            protos[fd.name] = fd

        def add(name: str) -> None:
            if name in self.added:
                return
            fd = protos.get(name)
            if fd is None:
                answer = self.ask(file_by_filename=name).file_descriptor_response.file_descriptor_proto
                fd = descriptor_pb2.FileDescriptorProto.FromString(answer[0])
            for dep in fd.dependency:
                add(dep)
            self.pool.Add(fd)
            self.added.add(name)

        for name in protos:
            add(name)


def main() -> None:
    opts, rest = parse(sys.argv[1:])
    if not rest:
        fail("no address")
    address, verb = rest[0], rest[1:]
    metadata = [tuple(part.strip() for part in h.split(":", 1)) for h in opts["headers"]]
    metadata = [(k.lower(), v) for k, v in metadata]
    with grpc.insecure_channel(address) as channel:
        reflection = Reflection(channel, metadata)
        services = reflection.services()
        if verb == ["list"]:
            print("\n".join(services))
            return
        if len(verb) == 2 and verb[0] == "describe":
            reflection.load(verb[1])
            print(reflection.pool.FindServiceByName(verb[1]).full_name)
            return
        if len(verb) != 1 or "/" not in verb[0]:
            fail(f"the stand-in knows `list`, `describe SYMBOL` and `SERVICE/METHOD`, not {verb}")
        service, method = verb[0].replace("/", ".", verb[0].count("/") - 1).split("/")
        if service not in services:
            fail(f"the server's reflection lists no {service}, only {services}")
        reflection.load(service)
        desc = reflection.pool.FindServiceByName(service).methods_by_name.get(method)
        if desc is None:
            fail(f"{service} has no method {method}")
        if desc.client_streaming or desc.server_streaming:
            fail(f"{service}/{method} streams: the stand-in checks unary calls")
        request_class = message_factory.GetMessageClass(desc.input_type)
        response_class = message_factory.GetMessageClass(desc.output_type)
        request = request_class()
        try:
            json_format.Parse(opts.get("data", "{}"), request)
        except json_format.ParseError as e:
            fail(f"-d does not parse as {desc.input_type.full_name}: {e}")
        call = channel.unary_unary(f"/{service}/{method}", request_serializer=request_class.SerializeToString,
                                   response_deserializer=response_class.FromString)
        try:
            answer = call(request, metadata=metadata, timeout=float(opts.get("max_time", 60)))
        except grpc.RpcError as e:
            print(f"ERROR:\n  Code: {e.code().name}\n  Message: {e.details()}", file=sys.stderr)
            sys.exit(e.code().value[0] + 64)
        print(json_format.MessageToJson(answer, indent=2))


if __name__ == "__main__":
    main()

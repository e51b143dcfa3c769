#!/usr/bin/env python3
"""A gRPC server and client (python `grpcio`) for the tests, with raw-bytes messages, so no
generated code is needed. Service `mesh.Echo`:

- `Unary`: answers the server's name;
- `ServerStream`: answers three messages `NAME i`;
- `ClientStream`: answers `NAME n` where n is how many messages it read;
- `Bidi`: answers every message as `NAME message`;
- `Slow`: answers after 3 seconds.

    grpc_echo.py serve NAME HOST PORT        prints "ready" once it listens
    grpc_echo.py call TARGET N [KEY=VALUE...] one channel (one HTTP/2 connection): N unary calls
        with the metadata given, then one call of each streaming kind; prints one JSON object:
        {"unary": {name: count}, "server_stream": [...], "client_stream": "...", "bidi": [...]}
    grpc_echo.py status TARGET METHOD TIMEOUT_S  one call; prints its status code name
"""
import json
import sys
import time
from concurrent import futures

import grpc

IDENTITY = dict(request_serializer=None, response_deserializer=None)
# Never an HTTP proxy from the environment: the test's traffic is the capture's.
OPTIONS = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]


def serve(name, host, port):
    def unary(request, context):
        return name.encode()

    def server_stream(request, context):
        for i in range(3):
            yield f"{name} {i}".encode()

    def client_stream(request_iterator, context):
        return f"{name} {sum(1 for _ in request_iterator)}".encode()

    def bidi(request_iterator, context):
        for m in request_iterator:
            yield f"{name} {m.decode()}".encode()

    def slow(request, context):
        time.sleep(3)
        return name.encode()

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(slow),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("mesh.Echo", handlers),))
    bracket = f"[{host}]" if ":" in host else host
    server.add_insecure_port(f"{bracket}:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def call(target, n, metadata):
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        unary = channel.unary_unary("/mesh.Echo/Unary", **IDENTITY)
        counts = {}
        for _ in range(n):
            name = unary(b"", metadata=metadata, timeout=10).decode()
            counts[name] = counts.get(name, 0) + 1
        server_stream = channel.unary_stream("/mesh.Echo/ServerStream", **IDENTITY)
        client_stream = channel.stream_unary("/mesh.Echo/ClientStream", **IDENTITY)
        bidi = channel.stream_stream("/mesh.Echo/Bidi", **IDENTITY)
        out = {
            "unary": counts,
            "server_stream": [m.decode() for m in server_stream(b"", metadata=metadata, timeout=10)],
            "client_stream": client_stream(iter([b"a", b"b", b"c", b"d"]), metadata=metadata, timeout=10).decode(),
            "bidi": [m.decode() for m in bidi(iter([b"x", b"y"]), metadata=metadata, timeout=10)],
        }
        print(json.dumps(out, sort_keys=True), flush=True)


def status(target, method, timeout):
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        try:
            channel.unary_unary(f"/mesh.Echo/{method}", **IDENTITY)(b"", timeout=timeout)
            print("OK")
        except grpc.RpcError as e:
            print(e.code().name, e.details())


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "serve":
        serve(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif cmd == "call":
        call(sys.argv[2], int(sys.argv[3]), [tuple(kv.split("=", 1)) for kv in sys.argv[4:]])
    elif cmd == "status":
        status(sys.argv[2], sys.argv[3], float(sys.argv[4]))

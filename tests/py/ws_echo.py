#!/usr/bin/env python3
"""A WebSocket echo server (python `websockets`) for the tests: greets each connection with
"NAME PATH", then sends every message back.

    ws_echo.py NAME HOST PORT

Prints "ready" once it listens.
"""
import sys

from websockets.sync.server import serve

name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


def handler(ws):
    ws.send(f"{name} {ws.request.path}")
    for message in ws:
        ws.send(message)


with serve(handler, host, port) as server:
    print("ready", flush=True)
    server.serve_forever()

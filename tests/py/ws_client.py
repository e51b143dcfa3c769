#!/usr/bin/env python3
"""A WebSocket client (python `websockets`) for the tests: connects, prints the server's greeting,
sends "one" and "two" and prints what comes back, one line each, then closes.

    ws_client.py URI [NAME=VALUE...]   (extra request headers)
"""
import sys

from websockets.sync.client import connect

headers = dict(h.split("=", 1) for h in sys.argv[2:])
with connect(sys.argv[1], additional_headers=headers, open_timeout=5, close_timeout=2) as ws:
    print(ws.recv(timeout=5))
    for message in ("one", "two"):
        ws.send(message)
        print(ws.recv(timeout=5))

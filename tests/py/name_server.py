#!/usr/bin/env python3
"""An HTTP/1.1 keep-alive server answering every GET with its name, for the tests.

    name_server.py NAME HOST PORT

Prints "ready" once it listens.
"""
import http.server
import socket
import sys

name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without this, Nagle holds the body for the client's
    # delayed ACK (40 ms a request).
    disable_nagle_algorithm = True

    def do_GET(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    address_family = socket.AF_INET6 if ":" in host else socket.AF_INET


server = Server((host, port), Handler)
print("ready", flush=True)
server.serve_forever()

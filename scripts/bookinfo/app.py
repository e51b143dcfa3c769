#!/usr/bin/env python3
"""The BookInfo services of the demo, small enough to read in one go.

    app.py productpage            calls http://reviews:9080 and http://ratings:9080 by name
    app.py reviews v1|v2|v3       v2 and v3 call http://ratings:9080 (v1 shows no stars)
    app.py ratings

Every service listens on 0.0.0.0:9080 and answers JSON. productpage forwards the `end-user`
header, as Istio's BookInfo does, so a route can match on it. None of them knows about the mesh:
names are resolved through /etc/hosts (the demo bind-mounts /etc/netns/<ns>/hosts there).
"""
import json, socket, sys, urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE = sys.argv[1]
VERSION = sys.argv[2] if len(sys.argv) > 2 else "v1"


def get(url, headers):
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=3) as r:
        return json.loads(r.read())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # Headers and body are two writes: without this, Nagle + delayed ACK stall each reply.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        user = {"end-user": self.headers["end-user"]} if self.headers["end-user"] else {}
        try:
            if ROLE == "productpage":
                reviews = get("http://reviews:9080/reviews/0", user)
                self.reply(200, {"product": 0, "reviews": reviews})
            elif ROLE == "reviews":
                body = {"version": VERSION, "text": "An extremely entertaining play by Shakespeare."}
                if VERSION != "v1":
                    body["ratings"] = get("http://ratings:9080/ratings/0", user)
                    body["stars"] = "black" if VERSION == "v2" else "red"
                self.reply(200, body)
            else:
                self.reply(200, {"id": 0, "stars": 5})
        except Exception as e:  # a failed upstream is the answer, not a crash
            self.reply(503, {"error": str(e)})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("0.0.0.0", 9080), Handler)
    server.daemon_threads = True
    print(f"{ROLE} {VERSION} ready", flush=True)
    server.serve_forever()

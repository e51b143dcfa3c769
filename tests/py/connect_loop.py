#!/usr/bin/env python3
"""Connects to ADDR again and again until STOP_FILE exists, one connection at a time, and reads
the one line an origdst_server.py answers with. Prints a summary line:

    connections=N by_port=15000:n,80:m errors=E first_error=...

`by_port` says which listening port answered (the proxy's or the real destination's), so a
connection that bypassed the proxy shows up under the destination's port; `errors` counts
connections that were refused, reset or timed out.
Usage: connect_loop.py ADDR STOP_FILE   (prints "started" after the first connection)
"""
import os, socket, sys

def main():
    addr, stop = sys.argv[1], sys.argv[2]
    host, _, port = addr.rpartition(":")
    host, port = host.strip("[]"), int(port)
    by_port, errors, first_error, n = {}, 0, "", 0
    while not os.path.exists(stop):
        n += 1
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            fields = dict(f.split("=", 1) for f in data.decode().split() if "=" in f)
            if "port" not in fields:
                raise OSError(f"no answer line: {data!r}")
            by_port[fields["port"]] = by_port.get(fields["port"], 0) + 1
        except OSError as e:
            errors += 1
            first_error = first_error or str(e).replace(" ", "_")
        if n == 1:
            print("started", flush=True)
    ports = ",".join(f"{p}:{c}" for p, c in sorted(by_port.items()))
    print(f"connections={n} by_port={ports} errors={errors} first_error={first_error or '-'}", flush=True)

if __name__ == "__main__":
    main()

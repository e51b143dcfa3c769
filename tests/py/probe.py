#!/usr/bin/env python3
"""Connects to ADDR (host:port or [v6]:port), prints the first line the server sends, or
`error: <reason>` and exits 1. Usage: probe.py ADDR [TIMEOUT_SECONDS]"""
import socket, sys

def main():
    addr, timeout = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        print(data.decode().strip() or "error: closed without a line")
        sys.exit(0 if data else 1)
    except OSError as e:
        print(f"error: {e}")
        sys.exit(1)

if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A stand-in for the proxy in interception tests: listens on the given ports (IPv4 and IPv6) and
answers every connection with one line saying where it was going and who sent it:

    orig=10.200.0.2:80 local=127.0.0.1:15000 peer=10.200.0.1:40000 port=15000

`orig` comes from SO_ORIGINAL_DST (IPv4) / IP6T_SO_ORIGINAL_DST (IPv6), or is `none` when the
socket has none (a connection that was not redirected, or one steered without NAT).
Usage: origdst_server.py PORT [PORT...]   (prints "ready" once every socket listens)
With TRANSPARENT=1 in the environment the sockets set IP_TRANSPARENT, as a TPROXY listener must;
BACKLOG=N sets the listen backlog (default 128).
"""
import os, selectors, socket, struct, sys

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

SO_ORIGINAL_DST = 80

def fmt(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

def original_dst(conn):
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack("!H", raw[2:4])[0]
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            if ip.startswith("::ffff:"):
                ip = ip[7:]
            return fmt((ip, port))
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack("!H", raw[2:4])[0]
        return fmt((socket.inet_ntoa(raw[4:8]), port))
    except OSError:
        return "none"

def main():
    sel = selectors.DefaultSelector()
    for port in map(int, sys.argv[1:]):
        for fam, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if os.environ.get("TRANSPARENT") == "1":
                if fam == socket.AF_INET:
                    s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                else:
                    s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((host, port))
            s.listen(int(os.environ.get("BACKLOG", "128")))
            sel.register(s, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()
            local = conn.getsockname()
            line = f"orig={original_dst(conn)} local={fmt(local)} peer={fmt(peer)} port={key.data}\n"
            try:
                conn.sendall(line.encode())
            finally:
                conn.close()

if __name__ == "__main__":
    main()

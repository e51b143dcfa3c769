#!/usr/bin/env python3
"""A DNS responder for the tests: answers every A query with one IPv4 address and every AAAA
query with one IPv6 address (other types: no answer), over UDP and TCP.

    dns_server.py PORT A_ADDR AAAA_ADDR BIND_ADDR...

Each BIND_ADDR gets its own sockets, so a UDP answer leaves from the address the query was sent
to: that is what lets conntrack translate an answer to a redirected query back (a wildcard
socket would answer from the pod's own address). Prints "ready" once every socket listens, and
one line per query answered: "udp|tcp NAME TYPE".
"""
import ipaddress
import socket
import struct
import sys
import threading

PORT = int(sys.argv[1])
A = ipaddress.IPv4Address(sys.argv[2]).packed
AAAA = ipaddress.IPv6Address(sys.argv[3]).packed
BINDS = sys.argv[4:]
lock = threading.Lock()


def log(line):
    with lock:
        print(line, flush=True)


def answer(query, transport):
    """The response to a query message, or None when it is not a query we understand. A name
    starting with "tc." is answered over UDP with TC set and no answer (too big for UDP), so that
    the client asks again over TCP."""
    if len(query) < 12:
        return None, None, None
    (qid, _flags, qdcount) = struct.unpack("!HHH", query[:6])
    if qdcount != 1:
        return None, None, None
    labels, at = [], 12
    while at < len(query) and query[at] != 0:
        n = query[at]
        labels.append(query[at + 1:at + 1 + n].decode("ascii", "replace"))
        at += 1 + n
    at += 1
    qtype, qclass = struct.unpack("!HH", query[at:at + 4])
    question = query[12:at + 4]
    rdata = {1: A, 28: AAAA}.get(qtype)
    ancount = 1 if rdata is not None and qclass == 1 else 0
    flags = 0x8180
    if labels[:1] == ["tc"] and transport == "udp":
        flags, ancount = flags | 0x0200, 0
    header = struct.pack("!HHHHHH", qid, flags, 1, ancount, 0, 0)
    body = question
    if ancount:
        # The name as a pointer to the question (offset 12), type, class IN, TTL 60.
        body += struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
    name = ".".join(labels)
    return header + body, name, {1: "A", 28: "AAAA"}.get(qtype, str(qtype))


def serve_udp(sock):
    while True:
        data, peer = sock.recvfrom(4096)
        reply, name, qtype = answer(data, "udp")
        if reply:
            sock.sendto(reply, peer)
            log(f"udp {name} {qtype}")


def serve_tcp_conn(conn):
    with conn:
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            data = conn.recv(n, socket.MSG_WAITALL)
            reply, name, qtype = answer(data, "tcp")
            if not reply:
                return
            conn.sendall(struct.pack("!H", len(reply)) + reply)
            log(f"tcp {name} {qtype}")


def serve_tcp(sock):
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn,), daemon=True).start()


threads = []
for addr in BINDS:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((addr, PORT))
    tcp = socket.socket(family, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((addr, PORT))
    tcp.listen(16)
    threads += [threading.Thread(target=serve_udp, args=(udp,), daemon=True),
                threading.Thread(target=serve_tcp, args=(tcp,), daemon=True)]
for t in threads:
    t.start()
log("ready")
for t in threads:
    t.join()

#!/usr/bin/env python3
"""Loopback data between two sockets of one process, for the three ways a sockmap fast path
lost or piled up data (issue 11):

  slow-reader BYTES   a writer sends BYTES (a repeated random block) and shuts down; the reader
                      reads slowly. Prints `sent=N received=N same=yes|no peak_queued=B limit=B
                      tcp_mem_before=B tcp_mem_peak=B` (queued: SIOCOUTQ + SIOCINQ of the pair;
                      limit: what TCP lets the pair's buffers grow to, the largest receive plus
                      send buffer of tcp_rmem/tcp_wmem; tcp_mem: the machine-wide TCP memory of
                      /proc/net/sockstat).
  unread-writer       writes without blocking into a socket nobody reads until the kernel says
                      EAGAIN. Prints `queued=B`.
  shutdown-recv N     N connections: the client sends, shuts down its side and waits in a
                      blocking recv() for the echo. Prints `connections=N eagain=E wrong=W`.
Usage: bulk.py MODE [ARG]
"""
import fcntl, hashlib, os, socket, struct, sys, threading, time

SIOCINQ, SIOCOUTQ = 0x541B, 0x5411

def queued(s, op):
    return struct.unpack("i", fcntl.ioctl(s.fileno(), op, b"\0" * 4))[0]

def tcp_mem():
    """Bytes of TCP memory in use on the whole machine (pages in /proc/net/sockstat)."""
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    return -1

def buffer_limit():
    """The largest receive plus send buffer TCP autotuning may give one connection's ends."""
    top = lambda name: int(open(f"/proc/sys/net/ipv4/{name}").read().split()[2])
    return top("tcp_rmem") + top("tcp_wmem")

def pair():
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(1)
    c = socket.create_connection(l.getsockname())
    s, _ = l.accept()
    l.close()
    return c, s

def slow_reader(total):
    block = os.urandom(1 << 20)
    writer, reader = pair()
    sent_hash, got_hash = hashlib.md5(), hashlib.md5()
    sent = [0]
    def write():
        while sent[0] < total:
            chunk = block[: min(len(block), total - sent[0])]
            writer.sendall(chunk)
            sent_hash.update(chunk)
            sent[0] += len(chunk)
        writer.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=write)
    before, peak_mem, peak_queued, received = tcp_mem(), 0, 0, 0
    t.start()
    buf = bytearray(1 << 16)
    while True:
        n = reader.recv_into(buf)
        if n == 0:
            break
        got_hash.update(memoryview(buf)[:n])
        received += n
        if received % (32 << 20) < n:
            # Slow: a pause every 32 MiB lets the writer run ahead and fill every queue.
            time.sleep(0.02)
            peak_queued = max(peak_queued, queued(writer, SIOCOUTQ) + queued(reader, SIOCINQ))
            peak_mem = max(peak_mem, tcp_mem())
    t.join()
    same = "yes" if received == sent[0] and got_hash.digest() == sent_hash.digest() else "no"
    print(f"sent={sent[0]} received={received} same={same} peak_queued={peak_queued} "
          f"limit={buffer_limit()} tcp_mem_before={before} tcp_mem_peak={peak_mem}", flush=True)

def unread_writer():
    writer, reader = pair()
    writer.setblocking(False)
    block, total = b"x" * (1 << 16), 0
    while True:
        try:
            total += writer.send(block)
        except BlockingIOError:
            break
        if total > (1 << 30):
            break
    print(f"queued={total} tcp_mem={tcp_mem()}", flush=True)

def shutdown_recv(n):
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(128)
    def serve():
        for _ in range(n):
            c, _ = l.accept()
            data = b""
            while True:
                chunk = c.recv(4096)
                if not chunk:
                    break
                data += chunk
            c.sendall(data)
            c.close()
    t = threading.Thread(target=serve)
    t.start()
    eagain = wrong = 0
    for i in range(n):
        s = socket.create_connection(l.getsockname())
        msg = b"%d\n" % i
        s.sendall(msg)
        s.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except BlockingIOError:
            eagain += 1
        if got != msg:
            wrong += 1
        s.close()
    t.join()
    print(f"connections={n} eagain={eagain} wrong={wrong}", flush=True)

def main():
    mode = sys.argv[1]
    if mode == "slow-reader":
        slow_reader(int(sys.argv[2]))
    elif mode == "unread-writer":
        unread_writer()
    elif mode == "shutdown-recv":
        shutdown_recv(int(sys.argv[2]))
    else:
        sys.exit(f"unknown mode {mode}")

if __name__ == "__main__":
    main()

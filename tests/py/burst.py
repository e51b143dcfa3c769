#!/usr/bin/env python3
"""A burst of N non-blocking connects, issued at once while the proxy is paused, then read.

The proxy (PROXY_PID, an origdst_server.py) is stopped with SIGSTOP before the first connect
and continued one second after the last, so that connections wait in its accept queue with
their original destination recorded but not yet asked for. Each socket dials its own
destination (port 1024 + i), alternately of HOST4 and HOST6, which the proxy's answer line
must name. Both families: every redirected connection of a family goes to the same proxy
address, so each needs its own source port, and past half the port range (the even ports,
which connect() tries first) every connect() scans the range: a burst of one family only
would spend most of its time there. The sockets are spread over worker processes of at most
15,000 each (the file-descriptor limit may be 20,000 and raising it needs CAP_SYS_RESOURCE).
Prints: connects=N answered=A missing=M wrong=W errors=E seconds=S
(`missing`: the proxy found no original destination; `wrong`: it found another socket's).
Usage: burst.py N HOST4 HOST6 PROXY_PID
"""
import errno, os, select, signal, socket, sys, time

PER_WORKER = 15000

def worker(first, count, hosts, issued_w, result_w):
    socks, want, errors = {}, {}, 0
    for i in range(first, first + count):
        v6 = i % 2 == 1
        s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        host, port = hosts[v6], 1024 + i % 60000
        err = s.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            continue
        socks[s.fileno()] = s
        want[s.fileno()] = f"[{host}]:{port}" if v6 else f"{host}:{port}"
    os.write(issued_w, b"x")
    ep = select.epoll()
    for fd in socks:
        ep.register(fd, select.EPOLLIN)
    buf = {fd: b"" for fd in socks}
    answered = missing = wrong = 0
    deadline = time.monotonic() + 120
    while socks and time.monotonic() < deadline:
        for fd, _ in ep.poll(1):
            s = socks[fd]
            try:
                chunk = s.recv(4096)
            except OSError:
                chunk, errors = b"", errors + 1
            buf[fd] += chunk
            if chunk and not buf[fd].endswith(b"\n"):
                continue
            fields = dict(f.split("=", 1) for f in buf[fd].decode().split() if "=" in f)
            if "orig" in fields:
                answered += 1
                if fields["orig"] == "none":
                    missing += 1
                elif fields["orig"] != want[fd]:
                    wrong += 1
            elif chunk == b"":
                errors += 1
            ep.unregister(fd)
            s.close()
            del socks[fd]
    errors += len(socks)
    os.write(result_w, f"{answered} {missing} {wrong} {errors}\n".encode())

def main():
    n, hosts, proxy = int(sys.argv[1]), (sys.argv[2], sys.argv[3]), int(sys.argv[4])
    start = time.monotonic()
    issued_r, issued_w = os.pipe()
    result_r, result_w = os.pipe()
    os.kill(proxy, signal.SIGSTOP)
    children = []
    try:
        for first in range(0, n, PER_WORKER):
            pid = os.fork()
            if pid == 0:
                try:
                    worker(first, min(PER_WORKER, n - first), hosts, issued_w, result_w)
                finally:
                    os._exit(0)
            children.append(pid)
        for _ in children:
            os.read(issued_r, 1)
        time.sleep(1)
    finally:
        os.kill(proxy, signal.SIGCONT)
    os.close(result_w)
    totals = [0, 0, 0, 0]
    with os.fdopen(result_r) as results:
        for line in results:
            totals = [a + int(b) for a, b in zip(totals, line.split())]
    for pid in children:
        os.waitpid(pid, 0)
    answered, missing, wrong, errors = totals
    print(f"connects={n} answered={answered} missing={missing} wrong={wrong} errors={errors} "
          f"seconds={time.monotonic() - start:.1f}", flush=True)

if __name__ == "__main__":
    main()

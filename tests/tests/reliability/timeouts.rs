//! (7) Timeouts in the right place: the route timeout counts from the end of the request (a slow
//! upload is not cut by it, Envoy's rule), and a response that stalls is cut after the stream
//! idle timeout instead of holding the client forever.

use std::{
    io::Write,
    thread,
    time::{Duration, Instant},
};

use mesh_lab::privileged;

use super::lab::{config, Client, Lab, B1, ECHO_PY, SERVICE};

/// `/stall`: headers and 2 bytes of a 10-byte body, then nothing (the connection stays open).
/// `/trickle`: a chunked body, one chunk every 400 ms for 2.4 s. Arguments: ip, port.
const STALL_PY: &str = r#"
import sys, socket, threading, time
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(64)
print("ready", flush=True)
def serve(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = c.recv(65536)
        if not d:
            return
        buf += d
    if buf.split(b" ")[1] == b"/stall":
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        time.sleep(60)
    else:
        c.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(6):
            time.sleep(0.4)
            c.sendall(b"1\r\nx\r\n")
        c.sendall(b"0\r\n\r\n")
        time.sleep(1)
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

#[test]
fn the_route_timeout_counts_from_the_end_of_the_request() {
    if !privileged("the_route_timeout_counts_from_the_end_of_the_request") {
        return;
    }
    let mut lab = Lab::new("rtmo");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    let cfg = config(&[B1], "").replace("rules: [{ clusters:", "rules: [{ timeout: 1s, clusters:");
    lab.start_proxy(&cfg);
    lab.net.pod.run(|| {
        // A 2.5 s upload (10 pieces, 250 ms apart), answered at once when complete.
        let mut c = Client::connect(SERVICE).unwrap();
        let head = format!("POST /up HTTP/1.1\r\nHost: {SERVICE}\r\nContent-Length: 10\r\n\r\n");
        c.stream().write_all(head.as_bytes()).unwrap();
        for _ in 0..10 {
            thread::sleep(Duration::from_millis(250));
            c.stream().write_all(b"x").unwrap();
        }
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200, "{}", r.body_text());
        assert!(r.body_text().starts_with("b1 /up body=10"), "{}", r.body_text());
        // The timeout still holds once the request is complete.
        let r = c.get("/sleep/2000").unwrap();
        assert_eq!(r.status, 504, "{}", r.body_text());
    });
}

#[test]
fn a_stalled_response_is_cut_after_the_stream_idle_timeout() {
    if !privileged("a_stalled_response_is_cut_after_the_stream_idle_timeout") {
        return;
    }
    let mut lab = Lab::new("ridle");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(STALL_PY, &[ip, port]);
    lab.start_proxy(&config(&[B1], "stream_idle_timeout: 1s\n"));
    lab.net.pod.run(|| {
        // Active for longer than the idle timeout: served whole.
        let r = Client::connect(SERVICE).unwrap().get("/trickle").unwrap();
        assert_eq!((r.status, r.body_text().as_str()), (200, "xxxxxx"));
        // Stalled after 2 bytes: the client's connection is closed after ~1 s, not held.
        let started = Instant::now();
        let r = Client::connect(SERVICE).unwrap().get("/stall");
        let took = started.elapsed();
        assert!(r.is_err(), "{r:?}");
        assert!(took < Duration::from_secs(5), "cut after {took:?}");
    });
}

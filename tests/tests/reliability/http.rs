//! (8) Half-close and (9) HTTP details: what reaches the backend is what HTTP says a proxy sends,
//! and an error is answered as the fault of whoever made it: a client's invalid body is 400 and
//! not held against the endpoint; a backend's invalid response is 502.

use std::{io::Write, net::Shutdown, time::Duration};

use mesh_lab::privileged;

use super::lab::{admin_get, config, Client, Lab, B1, SERVICE};

/// A backend that answers each request with its raw head as the body (`/bad`: an invalid status
/// line; `/clte`: a response with both Content-Length and Transfer-Encoding). Arguments: ip, port.
const RAW_PY: &str = r#"
import sys, socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(512)
print("ready", flush=True)
def serve(c):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                c.close(); return
            buf += d
        head, _, buf = buf.partition(b"\r\n\r\n")
        low = head.lower()
        if b"transfer-encoding:" in low:
            while b"0\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    c.close(); return
                buf += d
            buf = buf.split(b"0\r\n\r\n", 1)[1]
        else:
            n = 0
            for line in head.split(b"\r\n")[1:]:
                if line.lower().startswith(b"content-length:"):
                    n = int(line.split(b":")[1])
            while len(buf) < n:
                buf += c.recv(65536)
            buf = buf[n:]
        path = head.split(b" ")[1]
        if path == b"/bad":
            c.sendall(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"); c.close(); return
        if path == b"/clte":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            continue
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(head) + head)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn lab(tag: &str) -> Lab {
    let mut lab = Lab::new(tag);
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(RAW_PY, &[ip, port]);
    lab.start_proxy(&config(&[B1], ""));
    lab
}

/// Writes `raw` on a new connection to the service and reads the response.
fn raw(request: &str) -> std::io::Result<super::lab::Resp> {
    let mut c = Client::connect(SERVICE)?;
    c.stream().write_all(request.as_bytes())?;
    c.read_response(false)
}

/// The value of header `name` in the head the backend echoed.
fn seen<'a>(head: &'a str, name: &str) -> Vec<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

#[test]
fn requests_reach_the_backend_as_http_says() {
    if !privileged("requests_reach_the_backend_as_http_says") {
        return;
    }
    let lab = lab("rhttp");
    lab.net.pod.run(|| {
        // Half-close: the request, then shutdown(SHUT_WR), as `nc -N` or a batch client does.
        let mut c = Client::connect(SERVICE).unwrap();
        c.stream().write_all(format!("GET /half HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n").as_bytes()).unwrap();
        c.stream().shutdown(Shutdown::Write).unwrap();
        let r = c.read_response(false).expect("a response after the client's half-close");
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.body_text().starts_with("GET /half HTTP/1.1"), "{}", r.body_text());

        // HTTP/1.0 without Host: forwarded with the address the client dialled as Host.
        let r = raw("GET /h10 HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(seen(&r.body_text(), "host"), [SERVICE], "{}", r.body_text());

        // Two Host headers: 400 (RFC 9112 §3.2), and HTTP/1.1 without one.
        let r = raw(&format!("GET / HTTP/1.1\r\nHost: {SERVICE}\r\nHost: evil\r\n\r\n")).unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        let r = raw("GET / HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.status, 400, "{r:?}");

        // Absolute form: the URI's authority routes it and is the Host forwarded.
        let r = raw("GET http://svc:9080/abs HTTP/1.1\r\nHost: other\r\n\r\n").unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let head = r.body_text();
        assert!(head.starts_with("GET /abs HTTP/1.1"), "{head}");
        assert_eq!(seen(&head, "host"), ["svc:9080"], "{head}");

        // Transfer codings other than chunked are kept.
        let r = raw(&format!(
            "POST /te HTTP/1.1\r\nHost: {SERVICE}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        ))
        .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(seen(&r.body_text(), "transfer-encoding"), ["gzip, chunked"], "{}", r.body_text());

        // x-request-id made when absent, kept when present; x-forwarded-for names the client.
        let mut c = Client::connect(SERVICE).unwrap();
        let head = c.get("/id").unwrap().body_text();
        let id = seen(&head, "x-request-id");
        assert!(id.len() == 1 && id[0].len() == 36, "{head}");
        assert_eq!(seen(&head, "x-forwarded-for"), [mesh_e2e::POD_V4], "{head}");
        let head = c.send("GET", "/id", &[("x-request-id", "abc-1"), ("x-forwarded-for", "192.0.2.1")], b"");
        let head = head.unwrap().body_text();
        assert_eq!(seen(&head, "x-request-id"), ["abc-1"], "{head}");
        assert_eq!(seen(&head, "x-forwarded-for"), [format!("192.0.2.1, {}", mesh_e2e::POD_V4)], "{head}");
    });
    // Access lines are written in batches (about once a second).
    let kept = mesh_lab::try_wait_until(Duration::from_secs(5), "the request id in the access log", || {
        Ok(lab.log_text().lines().any(|l| l.contains("request_id") && l.contains("abc-1")).then_some(()))
    });
    assert!(kept.is_ok(), "the access log keeps the request id:\n{}", lab.log_text());
}

#[test]
fn errors_are_answered_as_the_fault_of_who_made_them() {
    if !privileged("errors_are_answered_as_the_fault_of_who_made_them") {
        return;
    }
    let lab = lab("rfault");
    lab.net.pod.run(|| {
        // An invalid chunk size from the client: 400, the endpoint not blamed.
        let r = raw(&format!(
            "POST /chunk HTTP/1.1\r\nHost: {SERVICE}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"
        ))
        .unwrap();
        assert_eq!(r.status, 400, "{r:?}");
        let clusters = admin_get("/clusters").1;
        assert!(clusters.contains(&format!("backend::{B1}::rq_error::0")), "{clusters}");

        // An invalid response from the backend: 502.
        let r = raw(&format!("GET /bad HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n")).unwrap();
        assert_eq!(r.status, 502, "{r:?}");

        // Both Content-Length and Transfer-Encoding: chunked wins (RFC 9112 §6.3), the client
        // gets the body.
        let r = raw(&format!("GET /clte HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n")).unwrap();
        assert_eq!((r.status, r.body_text().as_str()), (200, "hello"), "{r:?}");
    });
}

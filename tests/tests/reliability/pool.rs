//! (3) Pooled connections the backend has closed: a request that fails on a reused connection
//! before any byte of the response is sent again on a fresh connection when that is safe, and is
//! not counted against the endpoint; connections the peer closed leave the pool.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use mesh_lab::{privileged, wait_until};

use super::lab::{admin_get, config, Client, Lab, B1, ECHO_PY, SERVICE};

/// Answers one request per connection, then closes it without saying so (no `Connection:
/// close`), as servers with a very short keep-alive do. Prints each request line it got.
/// Arguments: ip, port.
const CLOSER_PY: &str = r#"
import sys, socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(512)
print("ready", flush=True)
def serve(c):
    data = b""
    while b"\r\n\r\n" not in data:
        got = c.recv(65536)
        if not got:
            c.close(); return
        data += got
    head, _, rest = data.partition(b"\r\n\r\n")
    n = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            n = int(line.split(b":")[1])
    while len(rest) < n:
        got = c.recv(65536)
        if not got:
            break
        rest += got
    print("got", head.split(b"\r\n")[0].decode(), flush=True)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn endpoint_stat(clusters: &str, stat: &str) -> u64 {
    let key = format!("backend::{B1}::{stat}::");
    clusters.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(u64::MAX)
}

#[test]
fn a_backend_closing_after_each_response_costs_no_request() {
    if !privileged("a_backend_closing_after_each_response_costs_no_request") {
        return;
    }
    let mut lab = Lab::new("rpool");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(CLOSER_PY, &[ip, port]);
    lab.start_proxy(&config(&[B1], ""));
    let failed = Arc::new(AtomicU64::new(0));
    lab.net.pod.run(|| {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let failed = failed.clone();
                thread::spawn(move || {
                    let mut c = Client::connect(SERVICE).unwrap();
                    for _ in 0..500 {
                        match c.get("/") {
                            Ok(r) if r.status == 200 => {}
                            other => {
                                eprintln!("failed: {:?}", other.map(|r| (r.status, r.body_text())));
                                failed.fetch_add(1, Ordering::Relaxed);
                                c = Client::connect(SERVICE).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        let clusters = admin_get("/clusters").1;
        assert_eq!(failed.load(Ordering::Relaxed), 0, "requests failed of 2,000; /clusters:\n{clusters}");
        assert_eq!(endpoint_stat(&clusters, "rq_total"), 2_000, "{clusters}");
        assert_eq!(endpoint_stat(&clusters, "rq_error"), 0, "{clusters}");
    });
}

#[test]
fn a_post_with_a_body_is_never_sent_twice() {
    if !privileged("a_post_with_a_body_is_never_sent_twice") {
        return;
    }
    let mut lab = Lab::new("rpost");
    let (ip, port) = B1.split_once(':').unwrap();
    let log = lab.backend_logged("closer", CLOSER_PY, &[ip, port]);
    lab.start_proxy(&config(&[B1], ""));
    lab.net.pod.run(|| {
        let mut c = Client::connect(SERVICE).unwrap();
        for i in 0..300 {
            if !matches!(c.send("POST", &format!("/post-{i}"), &[], b"payload"), Ok(r) if r.status == 200) {
                c = Client::connect(SERVICE).unwrap();
            }
        }
    });
    // Each POST reached the backend at most once (a request that did not reach it may fail).
    let mut seen = std::collections::HashSet::new();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        if let Some(req) = line.strip_prefix("got ") {
            assert!(seen.insert(req.to_string()), "{req} reached the backend twice");
        }
    }
    assert!(seen.len() > 250, "only {} POSTs arrived", seen.len());
}

#[test]
fn connections_the_backend_closed_leave_the_pool() {
    if !privileged("connections_the_backend_closed_leave_the_pool") {
        return;
    }
    let mut lab = Lab::new("revict");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    lab.start_proxy(&config(&[B1], ""));
    let idle = || {
        let json = admin_get("/clusters?format=json").1;
        let at = json.find("\"idle_connections\":").expect("idle_connections in /clusters");
        json[at + 19..].trim_start().split(|c: char| !c.is_ascii_digit()).next().unwrap().parse::<u64>().unwrap()
    };
    lab.net.pod.run(|| {
        let clients: Vec<Client> = (0..3).map(|_| Client::connect(SERVICE).unwrap()).collect();
        // Three requests in flight at once: three upstream connections, idle afterwards.
        thread::scope(|s| {
            for mut c in clients {
                s.spawn(move || assert_eq!(c.get("/").unwrap().status, 200));
            }
        });
        wait_until(Duration::from_secs(5), "idle pooled connections", || (idle() >= 1).then_some(()));
    });
    // The backend goes away: its connections are closed by the kernel.
    lab.procs.clear();
    lab.net.pod.run(|| wait_until(Duration::from_secs(5), "the pool emptied", || (idle() == 0).then_some(())));
}

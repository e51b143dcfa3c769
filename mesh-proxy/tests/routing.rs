//! The data plane on loopback: weighted HTTP routing on keep-alive connections, header routes,
//! retries, 503 and recovery, HTTP error handling, TCP with half-close and server-first protocols.
//!
//! The proxy runs in this process (`app::build`), except where a test reads its log: the real
//! binary writes one.

mod support;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use support::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const SPLIT_RULES: &str = "      - match: { headers: { end-user: jason } }
        clusters: [{ name: v2 }]
      - match: { path_prefix: /v3 }
        clusters: [{ name: v3 }]
      - clusters: [{ name: v1, weight: 50 }, { name: v3, weight: 50 }]";

async fn three_versions() -> (Backend, Backend, Backend) {
    (Backend::start("v1").await, Backend::start("v2").await, Backend::start("v3").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_per_request_on_one_keepalive_connection() {
    let (v1, v2, v3) = three_versions().await;
    let listen = free_addr();
    let yaml =
        listener_route(listen, "http", SPLIT_RULES, &[("v1", &[v1.addr]), ("v2", &[v2.addr]), ("v3", &[v3.addr])]);
    let proxy = InProcess::start(&yaml).await;

    let mut client = HttpClient::connect(listen).await.unwrap();
    let mut counts: HashMap<String, u32> = HashMap::new();
    let n = 2_000;
    for _ in 0..n {
        let (status, body) = client.get("/", &[]).await.expect("request on the keep-alive connection");
        assert_eq!(status, 200);
        *counts.entry(body).or_default() += 1;
    }
    let v1n = counts.get("v1").copied().unwrap_or(0);
    let v3n = counts.get("v3").copied().unwrap_or(0);
    assert_eq!(v1n + v3n, n, "{counts:?}");
    // ±5% of 2,000 around 1,000.
    assert!((900..=1_100).contains(&v1n), "v1 got {v1n} of {n}: {counts:?}");
    let downstream = proxy.admin("/stats/prometheus").await.1;
    assert!(downstream.contains("mesh_proxy_downstream_connections_total{listener=\"main\"} 1"), "{downstream}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_and_path_rules_pick_their_cluster() {
    let (v1, v2, v3) = three_versions().await;
    let listen = free_addr();
    let yaml =
        listener_route(listen, "auto", SPLIT_RULES, &[("v1", &[v1.addr]), ("v2", &[v2.addr]), ("v3", &[v3.addr])]);
    let _proxy = InProcess::start(&yaml).await;

    // curl, a real client, with the header.
    for _ in 0..20 {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-H", "end-user: jason", &format!("http://{listen}/productpage")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "v2", "{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut c = HttpClient::connect(listen).await.unwrap();
    for _ in 0..20 {
        assert_eq!(c.get("/v3/x", &[]).await.unwrap(), (200, "v3".into()));
        assert_eq!(c.get("/", &[("end-user", "jason")]).await.unwrap(), (200, "v2".into()));
        assert_ne!(c.get("/", &[("end-user", "bob")]).await.unwrap().1, "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_selects_the_route_on_a_shared_listener() {
    let (v1, v2, _v3) = three_versions().await;
    let listen = free_addr();
    let yaml = format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners: [{{ name: main, address: \"{listen}\" }}]
routes:
  - {{ name: reviews, destinations: [\"reviews:9080\"], rules: [{{ clusters: [{{ name: v1 }}] }}] }}
  - {{ name: ratings, destinations: [\"ratings\"], rules: [{{ clusters: [{{ name: v2 }}] }}] }}
clusters: [{{ name: v1 }}, {{ name: v2 }}]
endpoints: [{{ cluster: v1, addresses: [\"{}\"] }}, {{ cluster: v2, addresses: [\"{}\"] }}]
",
        v1.addr, v2.addr
    );
    let _proxy = InProcess::start(&yaml).await;
    let curl = |host: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "-",
                "-w",
                " %{http_code}",
                "-H",
                &format!("host: {host}"),
                &format!("http://{listen}/"),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(curl("reviews:9080"), "v1 200");
    assert_eq!(curl("Ratings:1234"), "v2 200");
    // No route for the host and the connection was not redirected: nothing to pass through to.
    assert!(curl("other:80").ends_with(" 404"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_endpoint_is_retried_on_another_then_503_then_recovery() {
    let v1 = Backend::start("v1").await;
    let dead = free_addr();
    let listen = free_addr();
    let rules = "      - clusters: [{ name: pair }]";
    // Round robin over [dead, live]: every request that lands on the dead one is retried.
    let yaml = listener_route(listen, "http", rules, &[("pair", &[dead, v1.addr])]);
    let proxy = ProxyProcess::start(&yaml).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    for _ in 0..10 {
        assert_eq!(c.get("/", &[]).await.unwrap(), (200, "v1".into()));
    }

    // Only the dead one: 503, the connection stays usable, and the reason is logged.
    let only_dead = listener_route(listen, "http", "      - clusters: [{ name: solo }]", &[("solo", &[dead])]);
    proxy.rewrite(&only_dead);
    // The same keep-alive connection for every poll (a mutex: each poll's future borrows it).
    let shared = tokio::sync::Mutex::new(c);
    let body = wait_until_async(Duration::from_secs(5), "the reload (a 503)", || async {
        let (status, body) = shared.lock().await.get("/", &[]).await.unwrap();
        (status == 503).then_some(body)
    })
    .await;
    let mut c = shared.into_inner();
    assert_eq!(body, "no healthy upstream");
    assert_eq!(c.get("/", &[]).await.unwrap().0, 503);
    assert!(proxy.log_text().contains("upstream connect failed"), "{}", proxy.log_text());

    // The backend comes back on that address: the next request works, no restart.
    let _back = Backend::start_on("back", dead, Duration::ZERO).await;
    assert_eq!(c.get("/", &[]).await.unwrap(), (200, "back".into()));
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_upstream_connect_failures_total{cluster=\"solo\"}"), "{stats}");
    assert!(
        stats.contains("mesh_proxy_requests_total{route=\"main\",cluster=\"solo\",response_class=\"5xx\"} 2"),
        "{stats}"
    );
}

/// Sends raw bytes, returns everything the proxy answered until it closed.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.expect("proxy closes").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_requests_get_400_and_431() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let yaml = listener_route(listen, "http", "      - clusters: [{ name: v1 }]", &[("v1", &[v1.addr])]);
    let proxy = InProcess::start(&yaml).await;

    let answer = raw_exchange(listen, b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n", "a".repeat(61 * 1024));
    let answer = raw_exchange(listen, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..101 {
        many.push_str(&format!("x-h{i}: 1\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(listen, many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    // Host, Connection and 98 more: 100 headers, exactly the limit, pass.
    let mut ok = String::from("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..98 {
        ok.push_str(&format!("x-h{i}: 1\r\n"));
    }
    ok.push_str("\r\n");
    let answer = raw_exchange(listen, ok.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("v1"), "{answer}");

    // The process is still serving.
    assert_eq!(HttpClient::connect(listen).await.unwrap().get("/", &[]).await.unwrap(), (200, "v1".into()));
    drop(proxy);
}

/// A server that reads until EOF, then answers with how much it got and closes.
async fn count_until_eof_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await.unwrap();
                s.write_all(format!("got {} bytes", buf.len()).as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_route_forwards_with_half_close() {
    let upstream = count_until_eof_server().await;
    let listen = free_addr();
    let yaml = listener_route(listen, "tcp", "      - clusters: [{ name: db }]", &[("db", &[upstream])]);
    let proxy = InProcess::start(&yaml).await;

    let mut s = TcpStream::connect(listen).await.unwrap();
    let payload = vec![7u8; 300_000];
    s.write_all(&payload).await.unwrap();
    // Half-close: the server only answers once it sees EOF, and the answer must still come back.
    s.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer, "got 300000 bytes");
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_tcp_connections_total{route=\"main\",cluster=\"db\"} 1"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_tcp_session_is_closed_after_tcp_idle_timeout() {
    let upstream = count_until_eof_server().await;
    let listen = free_addr();
    let yaml = listener_route(listen, "tcp", "      - clusters: [{ name: db }]", &[("db", &[upstream])]);
    let _proxy = InProcess::start(&format!("tcp_idle_timeout: 300ms\n{yaml}")).await;
    let mut s = TcpStream::connect(listen).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    // Nothing more either way: the proxy closes both sides; the client sees EOF, not a hang.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("closed by the idle timeout")
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocol_works_under_auto() {
    // An SMTP-like server: greets first, then answers one command.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"220 mail ready\r\n").await.unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap();
                if &buf[..n] == b"QUIT\r\n" {
                    s.write_all(b"221 bye\r\n").await.unwrap();
                }
            });
        }
    });
    let listen = free_addr();
    let yaml = listener_route(listen, "auto", "      - clusters: [{ name: mail }]", &[("mail", &[upstream])]);
    let _proxy = InProcess::start(&yaml).await;

    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(listen).await.unwrap();
    let mut greeting = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut greeting)).await.expect("greeting").unwrap();
    assert_eq!(&greeting, b"220 mail ready\r\n");
    // Detection gave up after its short bound; not asserted as a timing, only reported.
    eprintln!("greeting after {:?}", start.elapsed());
    s.write_all(b"QUIT\r\n").await.unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).await.unwrap();
    assert_eq!(rest, "221 bye\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_server_backend_http10_keeps_the_downstream_connection() {
    // python's http.server answers HTTP/1.0 and closes after each response; the proxy must still
    // keep the client's connection open and open a new upstream connection per request.
    let dir = TempDir::new("py");
    std::fs::write(dir.path().join("index.html"), "from python").unwrap();
    let py = PythonHttpServer::start(dir.path()).await;
    let upstream = py.addr;
    let listen = free_addr();
    let yaml = listener_route(listen, "http", "      - clusters: [{ name: py }]", &[("py", &[upstream])]);
    let _proxy = InProcess::start(&yaml).await;
    let out = std::process::Command::new("curl")
        .args(["-sS", "-w", " %{num_connects}\n", &format!("http://{listen}/"), &format!("http://{listen}/")])
        .output()
        .unwrap();
    drop(py);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from python 1\nfrom python 0\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_straight_to_the_listener_without_a_route_is_closed_not_looped() {
    let listen = free_addr();
    let yaml = format!("admin: {{ address: \"{{admin}}\" }}\noutbound_policy: allow_any\nlisteners: [{{ name: main, address: \"{listen}\" }}]\n");
    let proxy = ProxyProcess::start(&yaml).await;
    let stats = unrouted_connection_closed(listen, proxy.admin).await;
    assert!(
        stats.contains("mesh_proxy_downstream_connections_total{listener=\"main\"} 1"),
        "one connection, no loop: {stats}"
    );
    proxy.wait_log("addressed to the proxy's own listener").await;
}

//! A cluster's traffic policy against real servers on loopback: consistent hashing (a header, a
//! query parameter, a cookie the proxy issues, the source address) with ring hash and Maglev.

mod support;

use std::{collections::HashMap, net::SocketAddr, process::Command, time::Duration};

use support::*;

const NAMES: [&str; 5] = ["e0", "e1", "e2", "e3", "e4"];

/// A config with one HTTP listener routing everything to cluster `c`, whose fields besides its
/// name are `policy` (YAML flow-map entries), with `endpoints`.
fn config(listen: SocketAddr, policy: &str, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners: [{{ name: main, address: \"{listen}\" }}]
routes: [{{ name: main, destinations: [\"{listen}\"], protocol: http, rules: [{{ clusters: [{{ name: c }}] }}] }}]
clusters: [{{ name: c, connect_timeout: 1s, {policy} }}]
endpoints: [{{ cluster: c, addresses: [{}] }}]
",
        list.join(", ")
    )
}

async fn backends(n: usize) -> Vec<Backend> {
    let mut v = Vec::new();
    for name in &NAMES[..n] {
        v.push(Backend::start(name).await);
    }
    v
}

/// The endpoint (its name) each of `users` gets with header `x-user: user-<i>`, checking that
/// every user's `per_user` requests on one keep-alive connection all reach that one endpoint.
async fn by_user(listen: SocketAddr, users: usize, per_user: usize) -> Vec<String> {
    let mut c = HttpClient::connect(listen).await.unwrap();
    let mut out = Vec::with_capacity(users);
    for u in 0..users {
        let user = format!("user-{u}");
        let (status, first) = c.get("/", &[("x-user", &user)]).await.unwrap();
        assert_eq!(status, 200);
        for _ in 1..per_user {
            assert_eq!(c.get("/", &[("x-user", &user)]).await.unwrap(), (200, first.clone()), "{user} moved");
        }
        out.push(first);
    }
    out
}

/// Ring hash on a header: a user's requests stay on one endpoint; users spread; adding a fifth
/// endpoint to four moves about 1/5 of the users, all of them to the new endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_keeps_its_endpoint_and_a_new_endpoint_takes_about_one_nth() {
    let b = backends(5).await;
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let listen = free_addr();
    let policy = "consistent_hash: { http_header_name: x-user, ring_hash: { minimum_ring_size: 1024 } }";
    let proxy = InProcess::start(&config(listen, policy, &addrs[..4])).await;
    let dump = proxy.config_dump().await;
    assert_eq!(
        dump["config"]["clusters"][0]["consistent_hash"],
        serde_json::json!({ "key": { "header": "x-user" }, "algorithm": { "ring_hash": { "minimum_ring_size": 1024 } } })
    );

    let users = 400;
    let before = by_user(listen, users, 5).await;
    let mut spread: HashMap<&str, usize> = HashMap::new();
    for e in &before {
        *spread.entry(e).or_default() += 1;
    }
    assert_eq!(spread.len(), 4, "{spread:?}");
    assert!(spread.values().all(|&n| n >= users / 8), "{spread:?}");

    proxy.rewrite(&config(listen, policy, &addrs));
    wait_until_async(Duration::from_secs(5), "the fifth endpoint", || async {
        (proxy.config_dump().await["config"]["clusters"][0]["endpoints"].as_array().unwrap().len() == 5).then_some(())
    })
    .await;
    let after = by_user(listen, users, 2).await;
    let moved: Vec<usize> = (0..users).filter(|&u| before[u] != after[u]).collect();
    let to_new = moved.iter().filter(|&&u| after[u] == "e4").count();
    println!(
        "ring hash, 4 -> 5 endpoints: {} of {users} users moved (ideal 1/5 = {}), {to_new} to the new one",
        moved.len(),
        users / 5
    );
    assert_eq!(to_new, moved.len(), "users moved between the old endpoints");
    assert!((users / 10..=users * 3 / 10).contains(&moved.len()), "{} of {users} moved", moved.len());
}

/// Maglev on a query parameter: the same value, the same endpoint; a request without the parameter
/// is balanced by the cluster's policy (round robin) instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_on_a_query_parameter() {
    let b = backends(3).await;
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let listen = free_addr();
    let policy = "consistent_hash: { http_query_parameter_name: session, maglev: {} }";
    let _proxy = InProcess::start(&config(listen, policy, &addrs)).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    let mut seen = HashMap::new();
    for s in 0..30 {
        let path = format!("/x?a=1&session=s{s}");
        let (_, first) = c.get(&path, &[]).await.unwrap();
        for _ in 0..4 {
            assert_eq!(c.get(&path, &[]).await.unwrap().1, first, "{path}");
        }
        *seen.entry(first).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    let unkeyed: std::collections::HashSet<String> =
        bodies(&mut c, (0..6).map(|_| "/x?other=1".to_string())).await.into_iter().collect();
    assert_eq!(unkeyed.len(), 3, "round robin without the key: {unkeyed:?}");
}

/// The bodies of GETs of `paths`, one after the other on `c`.
async fn bodies(c: &mut HttpClient, paths: impl Iterator<Item = String>) -> Vec<String> {
    let mut out = Vec::new();
    for p in paths {
        out.push(c.get(&p, &[]).await.unwrap().1);
    }
    out
}

/// curl with a cookie jar, as a browser: the first answer issues the cookie (with its Max-Age and
/// Path), and every later request, carrying it, reaches the endpoint the first one did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cookie_is_issued_with_its_ttl_and_then_followed() {
    let b = backends(4).await;
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let listen = free_addr();
    let policy = "consistent_hash: { http_cookie: { name: sticky, ttl: 60s, path: / } }";
    let _proxy = InProcess::start(&config(listen, policy, &addrs)).await;
    let dir = TempDir::new("cookies");
    let mut firsts = HashMap::new();
    for client in 0..8 {
        let jar = dir.path().join(format!("jar{client}"));
        let curl = || {
            let out = Command::new("curl")
                .args(["-sS", "-D", "-", "-c", jar.to_str().unwrap(), "-b", jar.to_str().unwrap()])
                .arg(format!("http://{listen}/"))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let first = curl();
        let set = first.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).expect(&first);
        assert!(set.contains("sticky=") && set.contains("Max-Age=60") && set.contains("Path=/"), "{set}");
        let endpoint = first.rsplit("\r\n").next().unwrap().to_string();
        for _ in 0..5 {
            let again = curl();
            assert!(!again.to_ascii_lowercase().contains("set-cookie"), "issued twice: {again}");
            assert!(again.ends_with(&format!("\r\n\r\n{endpoint}")), "client {client} moved: {again}");
        }
        *firsts.entry(endpoint).or_insert(0) += 1;
    }
    assert!(firsts.len() >= 2, "8 clients' cookies all on one endpoint: {firsts:?}");
}

/// Source IP: every request from one address on one endpoint, other addresses elsewhere (curl
/// bound to 127.0.0.x, all loopback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_address_keeps_its_endpoint() {
    let b = backends(3).await;
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let listen = free_addr();
    let _proxy = InProcess::start(&config(listen, "consistent_hash: { use_source_ip: true }", &addrs)).await;
    let mut by_source = HashMap::new();
    for last in 1..=12u8 {
        let from = format!("127.0.0.{last}");
        let mut got = Vec::new();
        for _ in 0..3 {
            let out = Command::new("curl")
                .args(["-sS", "--interface", &from, &format!("http://{listen}/")])
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            got.push(String::from_utf8(out.stdout).unwrap());
        }
        assert!(got.iter().all(|g| *g == got[0]), "{from}: {got:?}");
        by_source.insert(from, got[0].clone());
    }
    let endpoints: std::collections::HashSet<_> = by_source.values().collect();
    assert!(endpoints.len() >= 2, "{by_source:?}");
}

/// Istio's circuit-breaking walk-through (httpbin with `maxConnections: 1`,
/// `http1MaxPendingRequests: 1`, then three concurrent client connections): one request in
/// flight on the one upstream connection, one waiting for it, the others answered 503 at once with
/// `x-envoy-overloaded` and counted as `upstream_rq_pending_overflow`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_one_connection_one_pending_three_clients() {
    let slow = Backend::start_on("slow", "127.0.0.1:0".parse().unwrap(), Duration::from_millis(30)).await;
    let listen = free_addr();
    let policy = "circuit_breakers: { max_connections: 1, max_pending_requests: 1 }";
    let proxy = InProcess::start(&config(listen, policy, &[slow.addr])).await;
    let per_client = 20;
    let clients: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = HttpClient::connect(listen).await.unwrap();
                let mut statuses = Vec::new();
                for _ in 0..per_client {
                    statuses.push(c.get("/", &[]).await.unwrap());
                }
                statuses
            })
        })
        .collect();
    let mut counts: HashMap<u16, usize> = HashMap::new();
    for c in clients {
        for (status, body) in c.await.unwrap() {
            match status {
                200 => assert_eq!(body, "slow"),
                503 => assert!(body.ends_with("reset reason: overflow"), "{body}"),
                other => panic!("status {other}: {body}"),
            }
            *counts.entry(status).or_default() += 1;
        }
    }
    let (ok, overflow) = (counts.get(&200).copied().unwrap_or(0), counts.get(&503).copied().unwrap_or(0));
    println!("circuit breaker, 3 clients x {per_client} requests: {ok} x 200, {overflow} x 503");
    assert!(ok > 0 && overflow > 0, "{counts:?}");
    let stats = proxy.admin("/stats/prometheus").await.1;
    let line = format!("mesh_proxy_upstream_rq_pending_overflow_total{{cluster=\"c\"}} {overflow}");
    assert!(stats.contains(&line), "{line} not in {stats}");
    // Never a second upstream connection.
    let clusters = proxy.admin("/clusters").await.1;
    assert!(clusters.contains(&format!("c::{}::cx_total::1\n", slow.addr)), "{clusters}");
    assert_eq!(slow.requests.load(std::sync::atomic::Ordering::Relaxed) as usize, ok);

    // The header Envoy adds to such a 503, seen by curl while the connection is busy.
    let busy: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { HttpClient::connect(listen).await.unwrap().get("/", &[]).await.unwrap() }))
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let out = Command::new("curl").args(["-sS", "-D", "-", &format!("http://{listen}/")]).output().unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    for b in busy {
        b.await.unwrap();
    }
    if head.starts_with("http/1.1 503") {
        assert!(head.contains("x-envoy-overloaded: true"), "{head}");
    }
}

/// A loopback HTTP/1.1 server answering its name with a status that can change; counts requests.
struct StatusBackend {
    addr: SocketAddr,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusBackend {
    async fn start(name: &'static str, status: u16) -> Self {
        use std::sync::{atomic::*, Arc};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let status = Arc::new(AtomicU16::new(status));
        let (r, s) = (requests.clone(), status.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, s) = (r.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        r.fetch_add(1, Ordering::Relaxed);
                        let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(name)));
                        *resp.status_mut() = hyper::StatusCode::from_u16(s.load(Ordering::Relaxed)).unwrap();
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Self { addr, requests, status, task }
    }

    fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for StatusBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Outlier detection: three 503s in a row eject an endpoint; it gets nothing while ejected, shows
/// `/failed_outlier_check` in `/clusters` and in the metrics, comes back after the base ejection
/// time, and a second ejection lasts twice as long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_endpoint_gets_nothing_then_traffic_again() {
    use std::time::Instant;
    let good = Backend::start("good").await;
    let bad = StatusBackend::start("bad", 503).await;
    let listen = free_addr();
    let policy = "outlier_detection: { consecutive_5xx_errors: 3, interval: 1s, base_ejection_time: 1s, max_ejection_percent: 100 }";
    let proxy = InProcess::start(&config(listen, policy, &[good.addr, bad.addr])).await;
    let flag = format!("c::{}::health_flags::/failed_outlier_check", bad.addr);
    let mut c = HttpClient::connect(listen).await.unwrap();

    // Round robin: the bad endpoint answers every other request until its third 503.
    let mut ejected_at = None;
    for _ in 0..10 {
        c.get("/", &[]).await.unwrap();
        if bad.requests() == 3 {
            ejected_at = Some(Instant::now());
            break;
        }
    }
    let ejected_at = ejected_at.expect("the bad endpoint got three requests");
    assert!(proxy.admin("/clusters").await.1.contains(&flag));
    for _ in 0..30 {
        assert_eq!(c.get("/", &[]).await.unwrap(), (200, "good".into()));
    }
    assert_eq!(bad.requests(), 3, "an ejected endpoint got requests");
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_outlier_ejections_total{cluster=\"c\"} 1"), "{stats}");
    assert!(stats.contains("mesh_proxy_outlier_ejections_active{cluster=\"c\"} 1"), "{stats}");

    // Back after about base_ejection_time (1 s), then traffic reaches it again.
    wait_until_async(Duration::from_secs(3), "the end of the ejection", || async {
        (!proxy.admin("/clusters").await.1.contains(&flag)).then_some(())
    })
    .await;
    let first = ejected_at.elapsed();
    assert!(first >= Duration::from_millis(900), "ejected for only {first:?}");
    for _ in 0..4 {
        c.get("/", &[]).await.unwrap();
    }
    assert!(bad.requests() > 3, "no traffic after the ejection");

    // Still failing: ejected again, now for 2 s.
    let before = bad.requests();
    let mut again = None;
    for _ in 0..10 {
        c.get("/", &[]).await.unwrap();
        if proxy.admin("/clusters").await.1.contains(&flag) {
            again = Some(Instant::now());
            break;
        }
    }
    let again = again.expect("a second ejection");
    assert!(bad.requests() - before <= 3);
    wait_until_async(Duration::from_secs(4), "the end of the second ejection", || async {
        (!proxy.admin("/clusters").await.1.contains(&flag)).then_some(())
    })
    .await;
    let second = again.elapsed();
    println!("outlier detection: first ejection {first:?}, second {second:?} (base 1s)");
    assert!(second >= Duration::from_millis(1_800), "the second ejection lasted {second:?}");
    bad.status.store(200, std::sync::atomic::Ordering::Relaxed);
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_outlier_ejections_total{cluster=\"c\"} 2"), "{stats}");
    assert!(stats.contains("mesh_proxy_outlier_ejections_active{cluster=\"c\"} 0"), "{stats}");
}

/// TCP keepalive on upstream connections, as the kernel reports it (`ss -o`: the keepalive timer
/// runs from `time`); `/config_dump` shows every cluster policy as applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_keepalive_reaches_the_kernel_and_the_dump_shows_the_policies() {
    let b = Backend::start("k").await;
    let listen = free_addr();
    let policy = "tcp_keepalive: { time: 7s, interval: 2s, probes: 4 }, circuit_breakers: { max_requests: 50 }, \
                  outlier_detection: { consecutive_gateway_errors: 2 }";
    let proxy = InProcess::start(&config(listen, policy, &[b.addr])).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    assert_eq!(c.get("/", &[]).await.unwrap(), (200, "k".into()));
    // The upstream connection now idles in the pool.
    let out = Command::new("ss").args(["-tnoH", "state", "established", "dst", &b.addr.to_string()]).output().unwrap();
    let ss = String::from_utf8_lossy(&out.stdout);
    let timer = ss.split("timer:(keepalive,").nth(1).unwrap_or_else(|| panic!("no keepalive timer: {ss:?}"));
    // The time left to the first probe, in seconds: ss writes `6.98sec` or (iproute2 6.x) `6.988ms`.
    let number: String = timer.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    let secs: f64 = number.parse().unwrap_or_else(|_| panic!("{ss}"));
    assert!((5.0..=7.0).contains(&secs), "keepalive timer {secs}s: {ss}");

    let cluster = &proxy.config_dump().await["config"]["clusters"][0];
    assert_eq!(cluster["tcp_keepalive"], serde_json::json!({ "probes": 4, "time": "7s", "interval": "2s" }));
    assert_eq!(cluster["circuit_breakers"]["max_requests"], 50);
    assert_eq!(cluster["outlier_detection"]["consecutive_gateway_errors"], 2);
    assert_eq!(cluster["outlier_detection"]["base_ejection_time"], "30s");
}

/// `max_requests_per_connection` (Istio's `maxRequestsPerConnection`): an upstream connection
/// carries that many requests, the last with `connection: close`, then a new one is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_connection_carries_at_most_max_requests() {
    let b = Backend::start("m").await;
    let listen = free_addr();
    let proxy = InProcess::start(&config(listen, "max_requests_per_connection: 2", &[b.addr])).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    for _ in 0..6 {
        assert_eq!(c.get("/", &[]).await.unwrap(), (200, "m".into()));
    }
    let clusters = proxy.admin("/clusters").await.1;
    assert!(clusters.contains(&format!("c::{}::cx_total::3\n", b.addr)), "{clusters}");
}

/// `idle_timeout` (Istio's `connectionPool.http.idleTimeout`): a pooled upstream connection idle
/// that long is closed by the proxy (within twice the timeout); the next request opens a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upstream_connection_is_closed_after_idle_timeout() {
    let b = Backend::start("i").await;
    let listen = free_addr();
    let proxy = InProcess::start(&config(listen, "idle_timeout: 300ms", &[b.addr])).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    assert_eq!(c.get("/", &[]).await.unwrap(), (200, "i".into()));
    let active = format!("c::{}::cx_active::", b.addr);
    assert!(proxy.admin("/clusters").await.1.contains(&format!("{active}1\n")));
    wait_until_async(Duration::from_secs(2), "the idle connection closed", || async {
        proxy.admin("/clusters").await.1.contains(&format!("{active}0\n")).then_some(())
    })
    .await;
    assert_eq!(c.get("/", &[]).await.unwrap(), (200, "i".into()));
    assert!(proxy.admin("/clusters").await.1.contains(&format!("c::{}::cx_total::2\n", b.addr)));
}

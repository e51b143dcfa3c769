//! The control side on loopback: reload by file edit and SIGHUP under load, discovery served by
//! python's http.server, rejected updates, listeners kept across reloads, the admin API, drain.

mod support;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use support::*;

fn split(v1_weight: u32, v2_weight: u32) -> String {
    let mut clusters = Vec::new();
    if v1_weight > 0 {
        clusters.push(format!("{{ name: v1, weight: {v1_weight} }}"));
    }
    if v2_weight > 0 {
        clusters.push(format!("{{ name: v2, weight: {v2_weight} }}"));
    }
    format!("      - clusters: [{}]", clusters.join(", "))
}

/// Keep-alive clients hammering `addr` until stopped; counts failures and the answers seen.
struct Load {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    /// Answers after `mark` was set that were not `expect_after`.
    stale_after_mark: Arc<AtomicU64>,
    mark: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, expect_after: &'static str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let stale = Arc::new(AtomicU64::new(0));
        let mark = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, failures, total, stale, mark) =
                    (stop.clone(), failures.clone(), total.clone(), stale.clone(), mark.clone());
                tokio::spawn(async move {
                    let mut c = HttpClient::connect(addr).await.unwrap();
                    // Bounded in count as well as by `stop`.
                    for _ in 0..200_000 {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let marked = mark.load(Ordering::Relaxed);
                        match c.get("/", &[]).await {
                            Ok((200, body)) => {
                                if marked && body != expect_after {
                                    stale.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Ok(_) | Err(_) => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                // A broken connection is a failure; go on with a new one.
                                if let Ok(n) = HttpClient::connect(addr).await {
                                    c = n;
                                }
                            }
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self { stop, failures, total, stale_after_mark: stale, mark, tasks }
    }

    async fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.total.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.stale_after_mark.load(Ordering::Relaxed),
        )
    }
}

/// Polls until every answer on a fresh connection is `want`, for up to `within` (generous: these
/// tests check that the switch happens without failures; the 1 s bound is asserted end to end in
/// tests/tests/proxy_e2e.rs).
async fn wait_for_all(addr: SocketAddr, want: &str, within: Duration) -> Duration {
    let start = Instant::now();
    let mut c = HttpClient::connect(addr).await.unwrap();
    loop {
        let mut all = true;
        for _ in 0..20 {
            if c.get("/", &[]).await.unwrap().1 != want {
                all = false;
                break;
            }
        }
        if all {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "still not all {want} after {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edit_switches_to_v2_under_load_with_zero_failures() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let listen = free_addr();
    let eps: [(&str, &[SocketAddr]); 2] = [("v1", &[v1.addr]), ("v2", &[v2.addr])];
    let proxy = ProxyProcess::start(&listener_route(listen, "http", &split(50, 50), &eps)).await;

    let load = Load::start(listen, 4, "v2");
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.rewrite(&listener_route(listen, "http", &split(0, 1), &eps));
    let took = wait_for_all(listen, "v2", Duration::from_secs(5)).await;
    eprintln!("switch seen after {took:?}");
    // From now on nothing but v2, on the connections that were open before the switch too.
    load.mark.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (total, failures, stale) = load.finish().await;
    eprintln!("{total} requests under load");
    assert_eq!(failures, 0, "failed requests during the reload");
    assert_eq!(stale, 0, "answers not from v2 after the switch");
    assert!(total > 100, "the load did run ({total})");
    let dump = proxy.config_dump().await;
    assert!(dump["last_rejected"].is_null(), "{dump}");
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_config_updates_total{source=\"file\",result=\"applied\"} 1"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_update_is_rejected_and_the_last_good_config_keeps_serving() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let eps: [(&str, &[SocketAddr]); 1] = [("v1", &[v1.addr])];
    let good = listener_route(listen, "http", &split(1, 0), &eps);
    let proxy = ProxyProcess::start(&good).await;
    let version_before = proxy.config_dump().await["version"].clone();

    let load = Load::start(listen, 2, "v1");
    load.mark.store(true, Ordering::Relaxed);
    // An unknown field on line 3, then a reference to a missing cluster.
    let typo = good.replace("listeners:\n  - { name: main,", "listeners:\n  - { nmae: main,");
    proxy.rewrite(&typo);
    let p = &proxy;
    let rejected = wait_until_async(Duration::from_secs(5), "the rejection in /config_dump", || async move {
        let dump = p.config_dump().await;
        (!dump["last_rejected"].is_null()).then_some(dump)
    })
    .await;
    let error = rejected["last_rejected"]["error"].as_str().unwrap().to_string();
    assert!(error.contains("unknown field `nmae`") && error.contains("line 3"), "{error}");
    assert_eq!(rejected["version"], version_before, "the good config is still the one in force");

    proxy.rewrite(&good.replace("clusters: [{ name: v1, weight: 1 }]", "clusters: [{ name: v9, weight: 1 }]"));
    let e = wait_until_async(Duration::from_secs(5), "the second rejection in /config_dump", || async move {
        let dump = p.config_dump().await;
        dump["last_rejected"]["error"].as_str().filter(|e| e.contains("v9")).map(str::to_string)
    })
    .await;
    assert_eq!(e, "routes[0].rules[0].clusters[0].name: cluster \"v9\" is not defined in clusters");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (total, failures, stale) = load.finish().await;
    assert!(total > 50);
    assert_eq!((failures, stale), (0, 0));
    let stats = proxy.admin("/stats/prometheus").await.1;
    assert!(stats.contains("mesh_proxy_config_updates_total{source=\"file\",result=\"rejected\"} 2"), "{stats}");
    assert!(proxy.log_text().contains("configuration update rejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_unchanged_listeners_keep_their_sockets() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let listen = free_addr();
    let second = free_addr();
    let eps: [(&str, &[SocketAddr]); 2] = [("v1", &[v1.addr]), ("v2", &[v2.addr])];
    let base = listener_route(listen, "http", &split(1, 0), &eps);
    let proxy = ProxyProcess::start(&base).await;
    let mut old_conn = HttpClient::connect(listen).await.unwrap();
    assert_eq!(old_conn.get("/", &[]).await.unwrap().1, "v1");

    // Add a listener and route for it; written without a rename so only SIGHUP is relied on...
    let with_second = base
        .replace(
            "listeners:\n",
            &format!("listeners:\n  - {{ name: second, address: \"{second}\" }}\n"),
        )
        .replace(
            "routes:\n",
            &format!("routes:\n  - {{ name: second, destinations: [\"{second}\"], protocol: http, rules: [{{ clusters: [{{ name: v2 }}] }}] }}\n"),
        );
    std::fs::write(&proxy.config, with_second.replace("{admin}", &proxy.admin.to_string())).unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGHUP);
    let mut c2 = wait_until_async(Duration::from_secs(5), "the second listener", || async {
        HttpClient::connect(second).await.ok()
    })
    .await;
    assert_eq!(c2.get("/", &[]).await.unwrap().1, "v2");
    // The first listener's established connection was not touched.
    assert_eq!(old_conn.get("/", &[]).await.unwrap().1, "v1");
    let (_, listeners) = proxy.admin("/listeners").await;
    assert!(
        listeners.contains(&format!("main::{listen}")) && listeners.contains(&format!("second::{second}")),
        "{listeners}"
    );

    // Removing the second listener stops it accepting; its open connection carries on.
    proxy.rewrite(&base);
    wait_until_async(Duration::from_secs(5), "the second listener to stop accepting", || async {
        HttpClient::connect(second).await.is_err().then_some(())
    })
    .await;
    // The route for it is gone, so the kept connection now gets 404 (not a reset).
    assert_eq!(c2.get("/", &[]).await.unwrap().0, 404);
    assert_eq!(old_conn.get("/", &[]).await.unwrap().1, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_from_python_http_server_switches_under_load() {
    let (v1, v2) = (Backend::start("v1").await, Backend::start("v2").await);
    let listen = free_addr();
    let dir = TempDir::new("xds");
    let v1dir = dir.path().join("mesh").join("v1");
    std::fs::create_dir_all(&v1dir).unwrap();
    let resources = |version: &str, body: String| format!("{{\"version_info\": \"{version}\", \"resources\": {body}}}");
    write_atomic(
        &v1dir.join("listeners"),
        &resources("1", format!("[{{\"name\": \"main\", \"address\": \"{listen}\"}}]")),
    );
    write_atomic(
        &v1dir.join("clusters"),
        &resources("1", "[{\"name\": \"v1\"}, {\"name\": \"v2\", \"lb_policy\": \"least_request\"}]".into()),
    );
    write_atomic(
        &v1dir.join("endpoints"),
        &resources(
            "1",
            format!(
                "[{{\"cluster\": \"v1\", \"addresses\": [\"{}\"]}}, {{\"cluster\": \"v2\", \"addresses\": [\"{}\"]}}]",
                v1.addr, v2.addr
            ),
        ),
    );
    let routes = |version: &str, cluster: &str| {
        resources(
            version,
            format!("[{{\"name\": \"main\", \"destinations\": [\"{listen}\"], \"protocol\": \"http\", \"rules\": [{{\"clusters\": [{{\"name\": \"{cluster}\", \"weight\": 100}}]}}]}}]"),
        )
    };
    write_atomic(&v1dir.join("routes"), &routes("1", "v1"));

    let py = PythonHttpServer::start(dir.path()).await;
    let port = py.addr.port();

    // The file has only the admin address and the discovery source.
    let yaml = format!("admin: {{ address: \"{{admin}}\" }}\ndiscovery:\n  url: http://127.0.0.1:{port}/mesh\n  poll_interval: 100ms\n");
    let proxy = ProxyProcess::start(&yaml).await;
    let what = format!("the discovered config serving (log: {})", proxy.log.display());
    let b = wait_until_async(Duration::from_secs(10), &what, || async {
        match HttpClient::connect(listen).await.ok()?.get("/", &[]).await {
            Ok((200, b)) => Some(b),
            _ => None,
        }
    })
    .await;
    assert_eq!(b, "v1");
    let dump = proxy.config_dump().await;
    assert_eq!(dump["source"], format!("discovery:http://127.0.0.1:{port}/mesh"));
    assert!(dump["version"].as_str().unwrap().contains("rds=1"), "{dump}");

    let load = Load::start(listen, 4, "v2");
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_atomic(&v1dir.join("routes"), &routes("2", "v2"));
    let took = wait_for_all(listen, "v2", Duration::from_secs(5)).await;
    eprintln!("discovery switch seen after {took:?}");
    load.mark.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A NACK: the server now names a cluster that does not exist; v2 keeps serving.
    write_atomic(&v1dir.join("routes"), &routes("3", "nope"));
    let p = &proxy;
    let dump = wait_until_async(Duration::from_secs(5), "the discovery rejection in /config_dump", || async move {
        let dump = p.config_dump().await;
        dump["last_rejected"]["version"].as_str().is_some_and(|v| v.contains("rds=3")).then_some(dump)
    })
    .await;
    assert!(dump["last_rejected"]["error"].as_str().unwrap().contains("\"nope\" is not defined"), "{dump}");
    assert!(dump["version"].as_str().unwrap().contains("rds=2"), "{dump}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (total, failures, stale) = load.finish().await;
    assert!(total > 100);
    assert_eq!((failures, stale), (0, 0));
    let stats = proxy.admin("/stats/prometheus").await.1;
    // Polled three more times at least, yet rejected once: the same answer is not re-counted.
    assert!(stats.contains("mesh_proxy_config_updates_total{source=\"discovery\",result=\"rejected\"} 1"), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let eps: [(&str, &[SocketAddr]); 1] = [("v1", &[v1.addr])];
    let proxy = ProxyProcess::start(&listener_route(listen, "http", &split(1, 0), &eps)).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    for _ in 0..3 {
        c.get("/", &[]).await.unwrap();
    }

    assert_eq!(proxy.admin("/ready").await, (200, "LIVE\n".into()));
    let dump = proxy.config_dump().await;
    assert_eq!(dump["config"]["listeners"][0]["address"], listen.to_string());
    assert_eq!(dump["config"]["clusters"][0]["endpoints"][0], v1.addr.to_string());
    assert_eq!(dump["config"]["clusters"][0]["connect_timeout"], "1s");
    assert!(dump["source"].as_str().unwrap().starts_with("file"));

    let (_, clusters) = proxy.admin("/clusters").await;
    assert!(clusters.contains(&format!("v1::{}::rq_total::3", v1.addr)), "{clusters}");
    assert!(clusters.contains(&format!("v1::{}::cx_total::1", v1.addr)), "one pooled upstream connection: {clusters}");
    let (_, json) = proxy.admin("/clusters?format=json").await;
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["clusters"][0]["endpoints"][0]["total_requests"], 3);

    let (_, stats) = proxy.admin("/stats/prometheus").await;
    for metric in [
        "mesh_proxy_downstream_connections_total{listener=\"main\"} 1",
        "mesh_proxy_downstream_connections_active{listener=\"main\"} 1",
        "mesh_proxy_requests_total{route=\"main\",cluster=\"v1\",response_class=\"2xx\"} 3",
        "mesh_proxy_upstream_connect_failures_total{cluster=\"v1\"} 0",
        "# TYPE mesh_proxy_config_updates counter",
    ] {
        assert!(stats.contains(metric), "{metric} missing:\n{stats}");
    }

    // The access log follows the filter set through the admin API.
    assert_eq!(admin_post(proxy.admin, "/logging?level=info,access%3Doff").await.0, 200);
    c.get("/while-off", &[]).await.unwrap();
    assert_eq!(admin_post(proxy.admin, "/logging?level=debug").await.0, 200);
    c.get("/while-on", &[]).await.unwrap();
    assert_eq!(admin_post(proxy.admin, "/logging?level=nonsense=[").await.0, 400);
    assert_eq!(proxy.admin("/nope").await.0, 404);
    assert_eq!(proxy.admin("/quitquitquit").await.0, 405);
    proxy.wait_log("/while-on").await;
    let log = proxy.log_text();
    assert!(!log.contains("/while-off"), "{log}");
}

/// SIGTERM drains as Istio does (the reliability suite, tests/tests/reliability/drain.rs, has the
/// rest): the request in flight finishes, new connections are still accepted meanwhile, and the
/// process exits 0 once none is open after `drain_minimum`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_request_in_flight_and_exits_0() {
    let slow = Backend::start_on("slow", "127.0.0.1:0".parse().unwrap(), Duration::from_millis(700)).await;
    let listen = free_addr();
    let eps: [(&str, &[SocketAddr]); 1] = [("v1", &[slow.addr])];
    let yaml = listener_route(listen, "http", &split(1, 0), &eps);
    let mut proxy = ProxyProcess::start(&format!("drain_minimum: 100ms\n{yaml}")).await;

    let mut c = HttpClient::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { c.get("/", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Still accepting while draining.
    assert!(tokio::net::TcpStream::connect(listen).await.is_ok(), "not accepting while draining");
    assert_eq!(in_flight.await.unwrap().unwrap(), (200, "slow".into()));
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status:?}; log:\n{}", proxy.log_text());
    assert!(proxy.log_text().contains("drained: every connection finished"), "{}", proxy.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_exits_0() {
    let listen = free_addr();
    let v1 = Backend::start("v1").await;
    let eps: [(&str, &[SocketAddr]); 1] = [("v1", &[v1.addr])];
    let mut proxy =
        ProxyProcess::start(&format!("drain_minimum: 100ms\n{}", listener_route(listen, "http", &split(1, 0), &eps)))
            .await;
    assert_eq!(admin_post(proxy.admin, "/quitquitquit").await, (200, "OK\n".into()));
    assert!(proxy.wait_exit(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn an_invalid_file_at_start_is_an_error_naming_the_field() {
    let dir = TempDir::new("bad");
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "listeners:\n  - name: a\n    address: 127.0.0.1:1\n    protocl: http\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-proxy")).arg("--config").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `protocl`") && err.contains("line 4"), "{err}");
}

/// The readiness port answers `GET /ready` as the admin API does and nothing else: the admin
/// API's `POST /quitquitquit` there is 404 and the proxy keeps running. A reload that moves it is
/// rejected, and while draining it answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_port_serves_only_ready() {
    let slow = Backend::start_on("slow", "127.0.0.1:0".parse().unwrap(), Duration::from_millis(700)).await;
    let listen = free_addr();
    let ready = free_addr();
    let eps: [(&str, &[SocketAddr]); 1] = [("v1", &[slow.addr])];
    let base = listener_route(listen, "http", &split(1, 0), &eps);
    let with_ready = |addr: SocketAddr| base.replacen('\n', &format!("\nreadiness: {{ address: \"{addr}\" }}\n"), 1);
    let mut proxy = ProxyProcess::start(&with_ready(ready)).await;

    assert_eq!(admin_get(ready, "/ready").await.unwrap(), (200, "LIVE\n".into()));
    assert_eq!(admin_post(ready, "/quitquitquit").await.0, 404);
    assert_eq!(admin_post(ready, "/logging?level=debug").await.0, 404);
    assert_eq!(admin_get(ready, "/config_dump").await.unwrap().0, 404);
    assert_eq!(admin_post(ready, "/ready").await.0, 404);
    assert_eq!(proxy.admin("/ready").await, (200, "LIVE\n".into()), "still running after POST /quitquitquit");
    let dump = proxy.config_dump().await;
    assert_eq!(dump["config"]["readiness"]["address"], ready.to_string());

    let elsewhere = free_addr();
    proxy.rewrite(&with_ready(elsewhere));
    let p = &proxy;
    let e = wait_until_async(Duration::from_secs(5), "the rejection in /config_dump", || async move {
        p.config_dump().await["last_rejected"]["error"].as_str().map(str::to_string)
    })
    .await;
    assert_eq!(
        e,
        format!("readiness.address cannot change while running ({ready} → {elsewhere}); restart to change it")
    );
    assert_eq!(admin_get(ready, "/ready").await.unwrap().0, 200);

    // A slow request in flight keeps the proxy draining long enough to ask.
    let mut c = HttpClient::connect(listen).await.unwrap();
    let in_flight = tokio::spawn(async move { c.get("/", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(admin_get(ready, "/ready").await.unwrap(), (503, "DRAINING\n".into()));
    assert_eq!(in_flight.await.unwrap().unwrap(), (200, "slow".into()));
    assert!(proxy.wait_exit(Duration::from_secs(10)).await.success());
}

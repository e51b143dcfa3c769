//! The access log with the real binary: its lines (JSON here; the text format has unit tests)
//! carry the request's fields and arrive batched, and a stderr that nobody reads costs requests
//! nothing: the lines that do not fit are dropped and counted.

mod support;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use support::*;

fn one_cluster(listen: std::net::SocketAddr, backend: std::net::SocketAddr) -> String {
    listener_route(listen, "http", "      - clusters: [{ name: v1 }]", &[("v1", &[backend])])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_carry_the_request() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let mut proxy = ProxyProcess::start_with(&one_cluster(listen, v1.addr), &["--log-format", "json"]).await;
    let mut c = HttpClient::connect(listen).await.unwrap();
    assert_eq!(c.get("/first?q=%22x%22", &[]).await.unwrap(), (200, "v1".into()));
    let line = proxy.wait_log("/first").await;
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["target"], "access");
    assert_eq!(v["kind"], "http");
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/first?q=%22x%22", "{line}");
    assert_eq!(v["route"], "main");
    assert_eq!(v["cluster"], "v1");
    assert_eq!(v["endpoint"], v1.addr.to_string());
    assert_eq!(v["status"], 200);
    assert_eq!(v["bytes"], 2);
    assert!(v["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{line}");

    // What is still batched when the proxy stops is written before it exits.
    assert_eq!(c.get("/last", &[]).await.unwrap(), (200, "v1".into()));
    drop(c);
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(proxy.wait_exit(Duration::from_secs(10)).await.success());
    assert!(proxy.log_text().contains("\"path\":\"/last\""), "{}", proxy.log_text());
}

/// The proxy with its stderr a pipe this test never reads: killed on drop.
struct Unread(Child);

impl Drop for Unread {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_stderr_drops_lines_and_blocks_no_request() {
    let v1 = Backend::start("v1").await;
    let listen = free_addr();
    let admin = free_addr();
    let dir = TempDir::new("access-log");
    let config = dir.write("proxy.yaml", &one_cluster(listen, v1.addr).replace("{admin}", &admin.to_string()));
    let _proxy = Unread(
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .arg("--config")
            .arg(&config)
            .args(["--workers", "1", "--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until_async(Duration::from_secs(10), "the proxy's /ready", || async {
        matches!(admin_get(admin, "/ready").await, Ok((200, _))).then_some(())
    })
    .await;

    // Lines of about 4 KiB: 1,500 of them are more than the pipe (64 KiB) and the access log's
    // bound (4 MiB) together. A request that waited for stderr would never finish.
    let path = format!("/{}", "a".repeat(4000));
    let mut c = HttpClient::connect(listen).await.unwrap();
    for i in 0..1500 {
        let got = tokio::time::timeout(Duration::from_secs(10), c.get(&path, &[])).await;
        assert_eq!(got.unwrap_or_else(|_| panic!("request {i} hung")).unwrap(), (200, "v1".into()));
    }
    let stats = admin_get(admin, "/stats/prometheus").await.unwrap().1;
    let counter = |name: &str| -> u64 {
        let line = stats.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name}:\n{stats}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let (queued, dropped) =
        (counter("mesh_proxy_access_log_lines_total"), counter("mesh_proxy_access_log_dropped_lines_total"));
    assert!(dropped > 0, "nothing dropped: {queued} queued");
    assert_eq!(queued + dropped, 1500, "every request's line was queued or counted as dropped");
}

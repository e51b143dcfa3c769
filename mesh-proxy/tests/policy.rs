//! Traffic policies of a route rule (issue 14) against real servers on loopback: retries (with
//! their budget), per-try and overall timeouts, fault injection (delay, abort, gRPC abort).
//!
//! Each test's proxy runs in this process (`app::build`) with one listener per route, so that one
//! config holds a rule with the policy and the same cluster without it, for comparison.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, Request, Response};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpListener;

/// An HTTP/1.1 server whose every `fail_every`-th request (counting from the first) is answered
/// 503, the others `200 ok <request body length>`, each after `delay`.
struct Flaky {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Flaky {
    async fn start(fail_every: u64, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let n = counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let mut resp = Response::new(Full::new(Bytes::from(format!("ok {body}"))));
                            if fail_every > 0 && n.is_multiple_of(fail_every) {
                                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                *resp.body_mut() = Full::new(Bytes::from_static(b"flaky"));
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Self { addr, requests, task }
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A config with one listener (and route) per `(listener, rule)`, and the given clusters.
fn config(routes: &[(SocketAddr, &str)], clusters: &[(&str, &[SocketAddr])]) -> String {
    let mut y = String::from("admin: { address: \"{admin}\" }\nlisteners:\n");
    for (i, (l, _)) in routes.iter().enumerate() {
        y.push_str(&format!("  - {{ name: l{i}, address: \"{l}\" }}\n"));
    }
    y.push_str("routes:\n");
    for (i, (l, rule)) in routes.iter().enumerate() {
        y.push_str(&format!(
            "  - name: r{i}\n    destinations: [\"{l}\"]\n    protocol: http\n    rules:\n      - {rule}\n"
        ));
    }
    y.push_str("clusters:\n");
    for (name, _) in clusters {
        y.push_str(&format!("  - {{ name: {name}, connect_timeout: 1s }}\n"));
    }
    y.push_str("endpoints:\n");
    for (name, addrs) in clusters {
        let list: Vec<String> = addrs.iter().map(|a| format!("\"{a}\"")).collect();
        y.push_str(&format!("  - {{ cluster: {name}, addresses: [{}] }}\n", list.join(", ")));
    }
    y
}

/// The value of one sample of the proxy's Prometheus text (0 when absent).
async fn metric(proxy: &InProcess, sample: &str) -> u64 {
    let text = proxy.admin("/stats/prometheus").await.1;
    text.lines().find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| {
        if text.contains(sample) {
            panic!("{sample}: not a number in {text}")
        } else {
            0
        }
    })
}

async fn statuses(listen: SocketAddr, n: usize) -> (usize, usize) {
    let mut c = HttpClient::connect(listen).await.unwrap();
    let mut ok = 0;
    for _ in 0..n {
        if c.get("/", &[]).await.unwrap().0 == 200 {
            ok += 1;
        }
    }
    (ok, n - ok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_turn_half_503s_into_no_client_errors() {
    let flaky = Flaky::start(2, Duration::ZERO).await;
    let (plain, retrying) = (free_addr(), free_addr());
    let yaml = config(
        &[
            (plain, "clusters: [{ name: flaky }]"),
            (retrying, "{ clusters: [{ name: flaky }], retries: { attempts: 2, retry_on: [\"5xx\"] } }"),
        ],
        &[("flaky", &[flaky.addr])],
    );
    let proxy = InProcess::start(&yaml).await;

    // Without a policy, half the requests fail.
    let (ok, failed) = statuses(plain, 200).await;
    assert_eq!((ok, failed), (100, 100));

    // With it, none does. The backend still fails every other request it gets: here each first
    // try (the alternation falls that way), each retry succeeding.
    let before = flaky.requests();
    let (ok, failed) = statuses(retrying, 400).await;
    assert_eq!((ok, failed), (400, 0));
    assert_eq!(flaky.requests() - before, 800);
    assert_eq!(metric(&proxy, "mesh_proxy_upstream_retry_events_total{cluster=\"flaky\",event=\"retry\"}").await, 400);
    // The client sees only the final answers.
    let ok2xx = "mesh_proxy_requests_total{route=\"r1\",cluster=\"flaky\",response_class=\"2xx\"}";
    assert_eq!(metric(&proxy, ok2xx).await, 400);

    // A request body that streamed whole to the first try is sent again (curl: a real client).
    for _ in 0..6 {
        let out = std::process::Command::new("curl")
            .args(["-sS", "-w", " %{http_code}", "--data-binary", "0123456789", &format!("http://{retrying}/post")])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok 10 200", "{}", String::from_utf8_lossy(&out.stderr));
    }
    // One larger than the retry buffer is not kept, so never sent twice: the 503 reaches the client.
    let dir = TempDir::new("policy-body");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1024 * 1024 + 1]).unwrap();
    let before = flaky.requests();
    let out = std::process::Command::new("curl")
        .args(["-sS", "-w", " %{http_code}", "--data-binary", &format!("@{}", big.display())])
        .arg(format!("http://{retrying}/post"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "flaky 503", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(flaky.requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_retries_when_everything_fails() {
    // Always 503, slowly: the retries of 30 concurrent requests overlap.
    let down = Flaky::start(1, Duration::from_millis(100)).await;
    let listen = free_addr();
    let rule = "{ clusters: [{ name: down }], retries: { attempts: 3, retry_on: [\"5xx\"], backoff: { base_interval: 1ms } } }";
    let proxy = InProcess::start(&config(&[(listen, rule)], &[("down", &[down.addr])])).await;
    let clients: Vec<_> = (0..30).map(|_| tokio::spawn(async move { statuses(listen, 1).await.1 })).collect();
    let mut failed = 0;
    for c in clients {
        failed += c.await.unwrap();
    }
    assert_eq!(failed, 30, "every request fails in the end");
    let retries = metric(&proxy, "mesh_proxy_upstream_retry_events_total{cluster=\"down\",event=\"retry\"}").await;
    let overflow = metric(&proxy, "mesh_proxy_upstream_retry_events_total{cluster=\"down\",event=\"overflow\"}").await;
    // Unbounded, 30 requests would be 90 retries; 20 % of 30 in flight is 6 at a time.
    assert!(overflow > 0 && retries < 90, "retries {retries}, refused {overflow}");
    assert_eq!(down.requests(), 30 + retries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_moves_on_and_the_rule_timeout_bounds_all_tries() {
    let slow = Flaky::start(0, Duration::from_secs(2)).await;
    let fast = Flaky::start(0, Duration::ZERO).await;
    let (mixed, bounded) = (free_addr(), free_addr());
    let per_try = "retries: { attempts: 2, per_try_timeout: 200ms, retry_on: [\"5xx\"] }";
    let yaml = config(
        &[
            (mixed, &format!("{{ clusters: [{{ name: both }}], {per_try} }}")),
            (bounded, "{ clusters: [{ name: slow }], timeout: 500ms, retries: { attempts: 10, per_try_timeout: 200ms, retry_on: [\"5xx\"] } }"),
        ],
        &[("both", &[slow.addr, fast.addr]), ("slow", &[slow.addr])],
    );
    let proxy = InProcess::start(&yaml).await;

    // Round robin sends every other try to the slow endpoint: its try times out, the retry
    // goes to the fast one.
    let (ok, failed) = statuses(mixed, 10).await;
    assert_eq!((ok, failed), (10, 0));
    let timeouts = "mesh_proxy_upstream_retry_events_total{cluster=\"both\",event=\"per_try_timeout\"}";
    assert!(metric(&proxy, timeouts).await >= 4);

    // Only slow endpoints: tries of 200 ms until the rule's 500 ms are spent, then 504.
    let before = slow.requests();
    let start = Instant::now();
    let mut c = HttpClient::connect(bounded).await.unwrap();
    assert_eq!(c.get("/", &[]).await.unwrap(), (504, "upstream request timeout".into()));
    let tries = slow.requests() - before;
    assert!((2..=3).contains(&tries), "{tries} tries in {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_and_abort_percentages_over_2000_requests() {
    let backend = Flaky::start(0, Duration::ZERO).await;
    let (listen, grpc) = (free_addr(), free_addr());
    let yaml = config(
        &[
            (
                listen,
                "{ clusters: [{ name: b }], fault: { delay: { fixed_delay: 2ms, percentage: 50 }, abort: { http_status: 500, percentage: 50 } } }",
            ),
            (grpc, "{ clusters: [{ name: b }], fault: { abort: { grpc_status: UNAVAILABLE } } }"),
        ],
        &[("b", &[backend.addr])],
    );
    let proxy = InProcess::start(&yaml).await;

    let n = 2_000;
    let mut c = HttpClient::connect(listen).await.unwrap();
    let (mut aborted, mut slow) = (0, 0);
    for _ in 0..n {
        let start = Instant::now();
        let (status, body) = c.get("/", &[]).await.unwrap();
        if start.elapsed() >= Duration::from_millis(2) {
            slow += 1;
        }
        match status {
            500 => {
                assert_eq!(body, "fault filter abort");
                aborted += 1;
            }
            200 => {}
            s => panic!("status {s}"),
        }
    }
    // ±5 % of 2,000 around 1,000; the aborted ones never reached the backend.
    assert!((900..=1_100).contains(&aborted), "{aborted} aborted of {n}");
    assert_eq!(backend.requests(), n - aborted);
    let delays = metric(&proxy, "mesh_proxy_faults_injected_total{route=\"r0\",kind=\"delay\"}").await;
    assert!((900..=1_100).contains(&delays), "{delays} delayed of {n}");
    assert!(slow >= delays, "every delayed request took the 2 ms: {slow} slow, {delays} delayed");
    assert_eq!(metric(&proxy, "mesh_proxy_faults_injected_total{route=\"r0\",kind=\"abort\"}").await, aborted);

    // A gRPC abort is a trailers-only gRPC status (curl reads its headers).
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/grpc",
            &format!("http://{grpc}/pkg.Svc/Call"),
        ])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200") && head.contains("grpc-status: 14"), "{head}");
    assert_eq!(backend.requests(), n - aborted, "the aborted call did not reach the backend");
}

//! The status port (Istio's 15020) and `mesh-proxy wait`, with the real binary configured as
//! `mesh-init inject` configures it (environment variables), against a real application server
//! (python's http.server) on loopback: the application's probes made through the proxy, the
//! merged metrics, and the hold-until-ready hook.

mod support;

use std::{
    net::SocketAddr,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use support::{admin_get, free_addr, free_port, wait_until_async, Proc, TempDir};

/// An application: 200 on /healthz, 500 on /fail, 200 on /hdr only with `X-Probe: kubelet`,
/// /slow answers after 3 s, /metrics in OpenMetrics text (with its `# EOF`).
const APP: &str = r##"
import sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body, code = b"ok\n", 200
        if self.path == "/fail": code = 500
        elif self.path == "/hdr": code = 200 if self.headers.get("X-Probe") == "kubelet" else 400
        elif self.path == "/slow": time.sleep(3)
        elif self.path == "/metrics": body = b"# TYPE app_requests counter\napp_requests_total 7\n# EOF\n"
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print("serving", flush=True)
s.serve_forever()
"##;

fn app(port: u16) -> Proc {
    let mut p = Proc::spawn(Command::new("python3").args(["-c", APP, &port.to_string()]).stdout(Stdio::piped()));
    p.wait_for_line("serving");
    p
}

/// mesh-proxy with the status port, the variables as the injector writes them.
struct Sidecar {
    /// Killed on drop.
    _proc: Proc,
    status: SocketAddr,
    ready: SocketAddr,
    _dir: TempDir,
}

fn config(dir: &TempDir, ready: SocketAddr) -> std::path::PathBuf {
    dir.write(
        "proxy.yaml",
        &format!(
            "admin: {{ address: \"{}\" }}\nreadiness: {{ address: \"{ready}\" }}\nlisteners:\n  - {{ name: l, address: \"{}\" }}\n",
            free_addr(),
            free_addr()
        ),
    )
}

impl Sidecar {
    async fn start(probers: &str, prometheus: &str) -> Self {
        let dir = TempDir::new("status");
        let (status, ready) = (free_addr(), free_addr());
        let config = config(&dir, ready);
        let proc = Proc::spawn_logged(
            "mesh-proxy",
            Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
                .arg("--config")
                .arg(&config)
                .args(["--workers", "1"])
                .env("MESH_PROXY_STATUS_ADDRESS", status.to_string())
                .env("INSTANCE_IP", "127.0.0.1")
                .env("ISTIO_KUBE_APP_PROBERS", probers)
                .env("ISTIO_PROMETHEUS_ANNOTATIONS", prometheus),
            &dir.path().join("proxy.log"),
        );
        wait_until_async(Duration::from_secs(10), "the status port", || async {
            admin_get(status, "/stats/prometheus").await.ok().filter(|(s, _)| *s == 200).map(|_| ())
        })
        .await;
        Self { _proc: proc, status, ready, _dir: dir }
    }

    async fn get(&self, path: &str) -> (u16, String) {
        admin_get(self.status, path).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }
}

#[tokio::test]
async fn the_applications_probes_are_made_through_the_status_port() {
    let port = free_port();
    let mut server = app(port);
    let closed = free_port();
    let probers = format!(
        r#"{{"/app-health/web/readyz":{{"httpGet":{{"path":"/healthz","port":{port},"scheme":"HTTP"}}}},
            "/app-health/web/livez":{{"tcpSocket":{{"port":{port}}}}},
            "/app-health/web/startupz":{{"httpGet":{{"path":"/fail","port":{port}}}}},
            "/app-health/hdr/readyz":{{"httpGet":{{"path":"/hdr","port":{port},"httpHeaders":[{{"name":"X-Probe","value":"kubelet"}}]}}}},
            "/app-health/slow/readyz":{{"httpGet":{{"path":"/slow","port":{port}}},"timeoutSeconds":1}},
            "/app-health/gone/livez":{{"tcpSocket":{{"port":{closed},"host":"127.0.0.1"}}}}}}"#
    );
    let sidecar = Sidecar::start(&probers, "").await;

    assert_eq!(sidecar.get("/app-health/web/readyz").await.0, 200);
    assert_eq!(sidecar.get("/app-health/web/livez").await.0, 200);
    assert_eq!(sidecar.get("/app-health/web/startupz").await, (500, "application answered 500\n".into()));
    assert_eq!(sidecar.get("/app-health/hdr/readyz").await.0, 200, "the probe's headers are sent");
    let start = Instant::now();
    let (status, body) = sidecar.get("/app-health/slow/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no answer within 1s"), "{body}");
    assert!(start.elapsed() < Duration::from_millis(2500), "the probe's timeout is kept: {:?}", start.elapsed());
    let (status, body) = sidecar.get("/app-health/gone/livez").await;
    assert_eq!(status, 503);
    assert!(body.contains(&format!("connecting to 127.0.0.1:{closed}")), "{body}");
    assert_eq!(sidecar.get("/app-health/nobody/readyz").await.0, 404);
    assert_eq!(sidecar.get("/other").await.0, 404);

    // The application goes away: its probes fail, the proxy's own readiness is unaffected.
    server.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5));
    assert_eq!(sidecar.get("/app-health/web/readyz").await.0, 503);
    assert_eq!(sidecar.get("/app-health/web/livez").await.0, 503);
    assert_eq!(admin_get(sidecar.ready, "/ready").await.unwrap().0, 200);
}

#[tokio::test]
async fn the_applications_metrics_are_merged_with_the_proxys() {
    let port = free_port();
    let _server = app(port);
    let sidecar = Sidecar::start("", &format!(r#"{{"scrape":"true","path":"/metrics","port":"{port}"}}"#)).await;
    let (status, body) = sidecar.get("/stats/prometheus").await;
    assert_eq!(status, 200);
    let app_line = body.find("app_requests_total 7").unwrap_or_else(|| panic!("{body}"));
    let proxy_line = body.find("mesh_proxy_").unwrap_or_else(|| panic!("{body}"));
    assert!(app_line < proxy_line, "{body}");
    assert_eq!(body.matches("# EOF").count(), 1, "one end marker, at the end: {body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");

    // Without the application, the proxy's metrics are still served, with the reason.
    let sidecar = Sidecar::start("", &format!(r#"{{"port":"{}"}}"#, free_port())).await;
    let (status, body) = sidecar.get("/stats/prometheus").await;
    assert_eq!(status, 200);
    assert!(body.starts_with("# mesh-proxy: the application's metrics at 127.0.0.1:"), "{body}");
    assert!(body.contains("mesh_proxy_"), "{body}");
}

#[test]
fn unusable_variables_stop_the_start_naming_them() {
    let dir = TempDir::new("status");
    let config = config(&dir, free_addr());
    for (var, value, want) in [
        ("ISTIO_KUBE_APP_PROBERS", "{not json", "ISTIO_KUBE_APP_PROBERS: not the JSON the injector writes"),
        ("ISTIO_KUBE_APP_PROBERS", r#"{"/health":{"tcpSocket":{"port":1}}}"#, "expected /app-health/<container>/"),
        ("ISTIO_PROMETHEUS_ANNOTATIONS", r#"{"port":"metrics"}"#, "port \"metrics\": not a port number"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .arg("--config")
            .arg(&config)
            .env("MESH_PROXY_STATUS_ADDRESS", free_addr().to_string())
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} accepted");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(text.contains(want), "{var}={value}: {text}");
    }
}

#[tokio::test]
async fn wait_returns_once_the_proxy_is_ready() {
    let dir = TempDir::new("wait");
    let ready = free_addr();
    let config = config(&dir, ready);
    // Started before the proxy, as the postStart hook may be.
    let mut waiter = Proc::spawn(
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
            .args(["wait", "--readiness-port", &ready.port().to_string(), "--timeout", "20s"])
            .stdout(Stdio::piped()),
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(waiter.is_running(), "wait returned before the proxy started");
    let _proxy = Proc::spawn_logged(
        "mesh-proxy",
        Command::new(env!("CARGO_BIN_EXE_mesh-proxy")).arg("--config").arg(&config),
        &dir.path().join("proxy.log"),
    );
    let line = waiter.wait_for_line("ready after");
    assert!(line.starts_with("mesh-proxy wait: ready after"), "{line}");
    let status =
        wait_until_async(Duration::from_secs(5), "wait to exit", || std::future::ready(waiter.exit_status())).await;
    assert!(status.success());

    // Nobody there: it gives up at its timeout, saying what it last saw.
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
        .args(["wait", "--readiness-port", &free_port().to_string(), "--timeout", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("the proxy was not ready within 1s") && stderr.contains("Connection refused"), "{stderr}");
}

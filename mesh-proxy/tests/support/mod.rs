//! Test fixtures: a whole proxy on loopback — in this process ([`InProcess`], `app::build`) or as
//! the real `mesh-proxy` binary ([`ProxyProcess`], for the command line, signals, reloads and
//! logs) — real HTTP and TCP servers, and a keep-alive HTTP client.
//!
//! Loopback connections carry no `SO_ORIGINAL_DST`, so the proxy routes them by the listener
//! address the client dialled: each test's config has routes whose destination is a listener
//! address (that is also how the proxy serves a connection that was not redirected).

#![allow(dead_code)] // Each test file uses a different part of this module.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    process::{Command, ExitStatus},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::{body::Incoming, client::conn::http1::SendRequest, Request, Response};
use hyper_util::rt::TokioIo;
pub use mesh_lab::{free_port, wait_until_async, write_atomic, Proc, TempDir};
use tokio::net::TcpListener;

/// A free loopback address (mesh-lab's [`free_port`]: never handed out twice).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// The mesh-proxy binary running with a config file in a scratch directory; killed on drop.
pub struct ProxyProcess {
    pub proc: Proc,
    pub config: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _dir: TempDir,
}

impl ProxyProcess {
    /// Starts the proxy; `{admin}` in `yaml` is replaced by a free admin address. Waits for `/ready`.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, &[]).await
    }

    /// [`ProxyProcess::start`] with more command-line arguments.
    pub async fn start_with(yaml: &str, args: &[&str]) -> Self {
        let dir = TempDir::new("proxy");
        let admin = free_addr();
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml.replace("{admin}", &admin.to_string())).unwrap();
        let log = dir.path().join("proxy.log");
        let proc = Proc::spawn_logged(
            "mesh-proxy",
            Command::new(env!("CARGO_BIN_EXE_mesh-proxy"))
                .arg("--config")
                .arg(&config)
                .args(["--workers", "2", "--log-level", "info"])
                .args(args),
            &log,
        );
        let what = format!("mesh-proxy's /ready (its log: {})", log.display());
        wait_until_async(Duration::from_secs(10), &what, || async {
            matches!(admin_get(admin, "/ready").await, Ok((200, _))).then_some(())
        })
        .await;
        Self { proc, config, admin, log, _dir: dir }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a log line containing `needle` and returns it: access-log lines are written in
    /// batches, up to a second after their request.
    pub async fn wait_log(&self, needle: &str) -> String {
        let what = format!("a log line with {needle:?} (log: {})", self.log.display());
        wait_until_async(Duration::from_secs(5), &what, || {
            std::future::ready(self.log_text().lines().find(|l| l.contains(needle)).map(str::to_string))
        })
        .await
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        self.proc.signal(sig);
    }

    /// Rewrites the config file (`{admin}` substituted as at start).
    pub fn rewrite(&self, yaml: &str) {
        write_atomic(&self.config, &yaml.replace("{admin}", &self.admin.to_string()));
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        admin_get(self.admin, path).await.unwrap()
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self.admin("/config_dump").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }

    /// Waits for the exit status, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let proc = &mut self.proc;
        wait_until_async(timeout, "mesh-proxy to exit", || std::future::ready(proc.exit_status())).await
    }
}

/// A whole proxy started in this process by `app::build`, its admin API on a port the kernel
/// chose; stopped on drop. Its log lines go wherever the test's subscriber sends them (none is
/// installed), so tests that read the proxy's log use [`ProxyProcess`].
pub struct InProcess {
    pub bound: mesh_proxy::app::Bound,
    pub config: PathBuf,
    _dir: TempDir,
}

impl InProcess {
    /// Starts the proxy with two data-plane workers; `{admin}` in `yaml` becomes `127.0.0.1:0`.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with(yaml, &Default::default()).await
    }

    /// [`InProcess::start`] with the command line's overrides (`--discovery-address`).
    pub async fn start_with(yaml: &str, overrides: &mesh_proxy::config::Overrides) -> Self {
        let dir = TempDir::new("proxy");
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml.replace("{admin}", "127.0.0.1:0")).unwrap();
        let loaded = mesh_proxy::config::load(&config, overrides).unwrap();
        let options = mesh_proxy::app::Options {
            workers: 2,
            log: None,
            status: None,
            dns_capture: false,
            inbound_tproxy_mark: None,
        };
        let bound = mesh_proxy::app::build(loaded, options).await.unwrap();
        Self { bound, config, _dir: dir }
    }

    /// Rewrites the config file (`{admin}` substituted as at start).
    pub fn rewrite(&self, yaml: &str) {
        write_atomic(&self.config, &yaml.replace("{admin}", "127.0.0.1:0"));
    }

    pub async fn admin(&self, path: &str) -> (u16, String) {
        admin_get(self.bound.admin, path).await.unwrap()
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let (status, body) = self.admin("/config_dump").await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

/// Connects straight to `listen`, which no route claims, sends a few bytes and waits for the
/// proxy to close the connection without an answer (it must not pass it on to itself); returns
/// the proxy's `/stats/prometheus` a moment later, whose connection count shows any loop.
pub async fn unrouted_connection_closed(listen: SocketAddr, admin: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
    let _ = s.write_all(b"hello").await;
    let mut rest = Vec::new();
    // Closed at once (EOF or reset), not passed through to itself.
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.expect("closed");
    assert!(rest.is_empty());
    tokio::time::sleep(Duration::from_millis(200)).await;
    admin_get(admin, "/stats/prometheus").await.unwrap().1
}

pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut c = HttpClient::connect(admin).await.map_err(|e| e.to_string())?;
    c.get(path, &[]).await.map_err(|e| e.to_string())
}

pub async fn admin_post(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut c = HttpClient::connect(admin).await.unwrap();
    c.request(hyper::Method::POST, path, &[]).await.unwrap()
}

/// One HTTP/1.1 keep-alive connection.
pub struct HttpClient {
    sender: SendRequest<Empty<Bytes>>,
    pub addr: SocketAddr,
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        Ok(Self { sender, addr })
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Result<(u16, String), hyper::Error> {
        self.request(hyper::Method::GET, path, headers).await
    }

    pub async fn request(
        &mut self,
        method: hyper::Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(u16, String), hyper::Error> {
        let mut b = Request::builder().method(method).uri(path).header("host", self.addr.to_string());
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.sender.ready().await?;
        let resp = self.sender.send_request(b.body(Empty::new()).unwrap()).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// An in-process HTTP/1.1 server that answers every request with its name; counts requests.
pub struct Backend {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &'static str) -> Self {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap(), Duration::ZERO).await
    }

    /// `delay` before each response (a slow backend, for drain tests).
    pub async fn start_on(name: &'static str, addr: SocketAddr, delay: Duration) -> Self {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        async move {
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(name.as_bytes()))))
                        }
                    });
                    // Above hyper's default of 100 headers: a request at the proxy's own limit
                    // arrives with the headers the proxy adds (x-request-id, x-forwarded-*, its hop).
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_headers(128)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, requests, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// python's http.server (HTTP/1.0, a connection per response) serving `dir` on a free loopback
/// port; its request log goes to a directory of its own. Killed on drop.
pub struct PythonHttpServer {
    pub addr: SocketAddr,
    _proc: Proc,
    _log: TempDir,
}

impl PythonHttpServer {
    /// Starts it and returns once it accepts connections.
    pub async fn start(dir: &std::path::Path) -> Self {
        let addr = free_addr();
        let log = TempDir::new("py-log");
        let proc = Proc::spawn_logged(
            "python3 -m http.server",
            Command::new("python3")
                .args(["-m", "http.server", &addr.port().to_string(), "--bind", "127.0.0.1"])
                .current_dir(dir),
            &log.path().join("http.log"),
        );
        wait_until_async(Duration::from_secs(10), "python http.server to listen", || async {
            tokio::net::TcpStream::connect(addr).await.ok()
        })
        .await;
        Self { addr, _proc: proc, _log: log }
    }
}

/// A YAML config with one HTTP listener whose own address routes to `rules`.
pub fn listener_route(listen: SocketAddr, protocol: &str, rules: &str, clusters: &[(&str, &[SocketAddr])]) -> String {
    let mut y = format!(
        "admin: {{ address: \"{{admin}}\" }}\nlisteners:\n  - {{ name: main, address: \"{listen}\" }}\nroutes:\n  - name: main\n    destinations: [\"{listen}\"]\n    protocol: {protocol}\n    rules:\n{rules}\nclusters:\n"
    );
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

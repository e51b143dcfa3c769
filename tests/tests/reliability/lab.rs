//! The reliability suite's pod: a [`PodNet`] with mesh-init's iptables rules in the pod, the real
//! `mesh-proxy` binary running there as UID 1337, backends in the remote namespace, and clients
//! that are the pod's application (root): plain sockets, curl, python.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use mesh_e2e::{bin, capture_everything, PodNet};
use mesh_lab::{try_wait_until, wait_until, write_atomic, Proc, TempDir};

/// What the application dials: a service address with no host behind it.
pub const SERVICE: &str = "10.200.100.1:9080";
/// Backends' addresses on the remote side.
pub const B1: &str = "10.200.1.1:8080";
pub const B2: &str = "10.200.1.2:8080";
pub const ADMIN: &str = "127.0.0.1:15090";

/// A pod with the capture rules in place and, once [`Lab::start_proxy`] ran, the proxy.
pub struct Lab {
    pub net: PodNet,
    pub dir: TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    pub proxy: Option<Proc>,
    pub procs: Vec<Proc>,
}

impl Lab {
    /// The namespaces, the backend addresses on the remote and mesh-init's rules in the pod
    /// (everything captured to 15000, UID 1337 exempt, the admin port 15090 left alone).
    pub fn new(tag: &str) -> Lab {
        let net = PodNet::new(tag);
        for addr in [B1, B2] {
            let ip = addr.split(':').next().unwrap();
            net.add_remote_addr(&format!("{ip}/32"));
        }
        let dir = TempDir::new(&format!("rel-{tag}"));
        capture_everything(&net.pod, "15090,15021");
        Lab {
            config: dir.path().join("proxy.yaml"),
            log: dir.path().join("proxy.log"),
            net,
            dir,
            proxy: None,
            procs: Vec::new(),
        }
    }

    /// Writes `config` and starts mesh-proxy as UID 1337 in the pod; waits for `/ready`.
    pub fn start_proxy(&mut self, config: &str) {
        self.write_config(config);
        self.spawn_proxy();
        self.wait_ready();
    }

    /// Starts mesh-proxy on the config file as it is, without waiting.
    pub fn spawn_proxy(&mut self) {
        let mut cmd = self.net.pod.command_as(1337, 1337, bin("mesh-proxy"));
        cmd.arg("--config").arg(&self.config).args(["--workers", "1", "--log-level", "info"]);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        cmd.stderr(log);
        self.proxy = Some(Proc::spawn(&mut cmd));
    }

    pub fn wait_ready(&self) {
        self.wait_ready_within(Duration::from_secs(10));
    }

    /// Waits up to `limit` for `/ready` (a large config takes a while in a debug build).
    pub fn wait_ready_within(&self, limit: Duration) {
        let ready = self
            .net
            .pod
            .run(|| try_wait_until(limit, "mesh-proxy's /ready", || Ok((admin_get("/ready").0 == 200).then_some(()))));
        if let Err(e) = ready {
            panic!("{e:#}; log:\n{}", self.log_text());
        }
    }

    /// The proxy's process, once started.
    pub fn proxy(&mut self) -> &mut Proc {
        self.proxy.as_mut().expect("the proxy was started")
    }

    /// Replaces the config file atomically (a sibling renamed over it).
    pub fn write_config(&self, text: &str) {
        write_atomic(&self.config, text);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `python3 -c script args...` in the remote namespace; waits for its "ready" line.
    pub fn backend(&mut self, script: &str, args: &[&str]) {
        let mut p = Proc::spawn(self.net.remote.command("python3").args(["-u", "-c", script]).args(args));
        p.wait_for_line("ready");
        self.procs.push(p);
    }

    /// Like [`Lab::backend`], its output going to a file in the scratch directory, whose path is
    /// returned (for what the backend printed about the requests it got).
    pub fn backend_logged(&mut self, name: &str, script: &str, args: &[&str]) -> PathBuf {
        let log = self.dir.path().join(format!("{name}.log"));
        let mut cmd = self.net.remote.command("python3");
        cmd.args(["-u", "-c", script]).args(args);
        self.procs.push(Proc::spawn_logged(name, &mut cmd, &log));
        wait_until(Duration::from_secs(10), &format!("{name} ready"), || {
            std::fs::read_to_string(&log).ok().filter(|t| t.contains("ready")).map(|_| ())
        });
        log
    }
}

/// An admin API GET from inside the pod's namespace (call within `net.pod.run`).
pub fn admin_get(path: &str) -> (u16, String) {
    match Client::connect(ADMIN).and_then(|mut c| c.send("GET", path, &[], b"")) {
        Ok(r) => (r.status, r.body_text()),
        Err(_) => (0, String::new()),
    }
}

/// A client in the pod sending requests to [`SERVICE`] one after another until stopped; counts
/// those that did not get a 200.
pub struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    thread: thread::JoinHandle<()>,
}

impl Load {
    /// Call within the pod's namespace.
    pub fn start() -> Load {
        let (stop, failed, total) =
            (Arc::<AtomicBool>::default(), Arc::<AtomicU64>::default(), Arc::<AtomicU64>::default());
        let (s, f, t) = (Arc::clone(&stop), failed.clone(), total.clone());
        let thread = thread::spawn(move || {
            let mut c = Client::connect(SERVICE).ok();
            while !s.load(Ordering::Relaxed) {
                let ok = c.as_mut().is_some_and(|c| matches!(c.get("/"), Ok(r) if r.status == 200));
                t.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    f.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(10));
                    c = Client::connect(SERVICE).ok();
                }
            }
        });
        Load { stop, failed, total, thread }
    }

    /// (requests, failed)
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (self.total.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

/// One response as read by [`Client`].
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A blocking HTTP/1.1 client on one keep-alive connection: enough HTTP to read any response
/// (Content-Length, chunked, or until close), and raw writes for hostile requests.
pub struct Client {
    pub r: BufReader<TcpStream>,
    pub host: String,
}

impl Client {
    pub fn connect(addr: &str) -> std::io::Result<Client> {
        let sa: SocketAddr = addr.parse().unwrap();
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_nodelay(true)?;
        Ok(Client { r: BufReader::new(s), host: addr.to_string() })
    }

    pub fn stream(&mut self) -> &mut TcpStream {
        self.r.get_mut()
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Resp> {
        self.send("GET", path, &[], b"")
    }

    /// Sends a request (Host and, with a body, Content-Length added) and reads the response.
    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> std::io::Result<Resp> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream().write_all(&bytes)?;
        self.read_response(method == "HEAD")
    }

    /// Reads one response.
    pub fn read_response(&mut self, head_only: bool) -> std::io::Result<Resp> {
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the status line"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            line.clear();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed in the headers"));
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let mut resp = Resp { status, headers, body: Vec::new() };
        if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
            return Ok(resp);
        }
        let chunked = resp.header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().ends_with("chunked"));
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    loop {
                        line.clear();
                        self.r.read_line(&mut line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0u8; size + 2];
                self.r.read_exact(&mut chunk)?;
                resp.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().map_err(std::io::Error::other)?;
            resp.body = vec![0u8; len];
            self.r.read_exact(&mut resp.body)?;
        } else {
            self.r.read_to_end(&mut resp.body)?;
        }
        Ok(resp)
    }
}

/// The proxy's config for one route from [`SERVICE`] to a cluster `backend` of `endpoints`;
/// `extra` is appended at the top level (bootstrap fields).
pub fn config(endpoints: &[&str], extra: &str) -> String {
    let eps = endpoints.iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "admin: {{ address: {ADMIN} }}
readiness: {{ address: 0.0.0.0:15021 }}
listeners:
  - {{ name: virtual, address: 0.0.0.0:15000 }}
routes:
  - name: svc
    destinations: [\"{SERVICE}\", \"svc:9080\"]
    protocol: http
    rules: [{{ clusters: [{{ name: backend }}] }}]
clusters:
  - {{ name: backend, connect_timeout: 1s }}
endpoints:
  - {{ cluster: backend, addresses: [{eps}] }}
{extra}"
    )
}

/// A python HTTP/1.1 keep-alive server (`ThreadingHTTPServer`) answering GET, HEAD and POST
/// with its name, the request's path and the headers it got (`name path\nheader: value...`),
/// after sleeping N ms for `/sleep/N`. Arguments: name, ip, port.
pub const ECHO_PY: &str = r#"
import sys, time, socket, http.server
name, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def answer(self):
        if self.path.startswith("/sleep/"):
            time.sleep(int(self.path.split("/")[2]) / 1000)
        n = int(self.headers.get("Content-Length") or 0)
        got = self.rfile.read(n) if n else b""
        lines = [f"{name} {self.path} body={len(got)}"] + [f"{k.lower()}: {v}" for k, v in self.headers.items()]
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = answer
    def log_message(self, *a):
        pass
class S(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512
s = S((host, port), H)
print("ready", flush=True)
s.serve_forever()
"#;

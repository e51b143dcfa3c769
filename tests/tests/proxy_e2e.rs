//! mesh-proxy end to end: a pod namespace with mesh-init's iptables rules and mesh-proxy running
//! as UID 1337, three backend versions (python HTTP/1.1 keep-alive servers) in the remote
//! namespace, and clients that are plain sockets in the pod (the application, as root) dialling a
//! service address that exists nowhere: only the proxy's routing makes it answer.
//!
//! Everything is inside the two namespaces of each test, joined to each other only; loads are
//! bounded in count and time.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::Stdio,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use mesh_e2e::{bin, capture_everything, script, PodNet, POD_V4, POD_V6, REMOTE_V4, REMOTE_V6};
use mesh_lab::{privileged, try_wait_until, wait_until, write_atomic, Proc, TempDir};

/// What the application dials: a service address with no host behind it.
const SERVICE: &str = "10.200.100.1:9080";
/// The same service's IPv6 address.
const SERVICE_V6: &str = "[fd00:200:100::1]:9080";
/// The three versions' addresses, on the remote side.
const V1: &str = "10.200.1.1:8080";
const V2: &str = "10.200.1.2:8080";
const V3: &str = "10.200.1.3:8080";
/// An address on the remote where nothing listens (until the test starts something).
const DEAD: &str = "10.200.1.9:8080";
const ADMIN: &str = "127.0.0.1:15090";

/// A server-first protocol (SMTP-like): greets, then answers QUIT.
const GREETER_PY: &str = r#"
import sys, socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(16)
print("ready", flush=True)
def serve(c):
    c.sendall(b"220 greeter ready\r\n")
    if c.recv(64) == b"QUIT\r\n":
        c.sendall(b"221 bye\r\n")
    c.close()
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The mesh: namespaces, backends, rules, the proxy.
struct Mesh {
    net: PodNet,
    dir: TempDir,
    config: PathBuf,
    log: PathBuf,
    procs: Vec<Proc>,
}

impl Mesh {
    /// Namespaces, the three versions, mesh-init's rules in the pod, and mesh-proxy as UID 1337
    /// with `config` (its `{dir}` replaced by the scratch directory).
    fn start(tag: &str, config: &str) -> Mesh {
        let net = PodNet::new(tag);
        for addr in [V1, V2, V3, DEAD] {
            let ip = addr.split(':').next().unwrap();
            net.add_remote_addr(&format!("{ip}/32"));
        }
        let dir = TempDir::new(&format!("e2e-{tag}"));
        let mut mesh = Mesh {
            config: dir.path().join("proxy.yaml"),
            log: dir.path().join("proxy.log"),
            net,
            dir,
            procs: Vec::new(),
        };
        for (name, addr) in [("v1", V1), ("v2", V2), ("v3", V3)] {
            mesh.backend_remote(name, addr);
        }
        capture_everything(&mesh.net.pod, "15090");
        mesh.write_config(config);
        let mut cmd = mesh.net.pod.command_as(1337, 1337, bin("mesh-proxy"));
        cmd.arg("--config").arg(&mesh.config).args(["--workers", "1"]);
        cmd.stderr(std::fs::File::create(&mesh.log).unwrap());
        let proxy = Proc::spawn(&mut cmd);
        mesh.procs.push(proxy);
        let ready = mesh.net.pod.run(|| {
            try_wait_until(Duration::from_secs(10), "mesh-proxy's /ready", || {
                Ok(matches!(Http::connect(ADMIN).and_then(|mut c| c.get("/ready", &[])), Ok((200, _))).then_some(()))
            })
        });
        if let Err(e) = ready {
            panic!("{e:#}; log:\n{}", mesh.log_text());
        }
        mesh
    }

    fn backend_remote(&mut self, name: &str, addr: &str) {
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let mut p =
            Proc::spawn(self.net.remote.command("python3").arg(script("name_server.py")).args([name, ip, port]));
        p.wait_for_line("ready");
        self.procs.push(p);
    }

    fn write_config(&self, text: &str) {
        write_atomic(&self.config, &text.replace("{dir}", &self.dir.path().display().to_string()));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A blocking HTTP/1.1 keep-alive client: enough HTTP to read status and a Content-Length body.
struct Http {
    r: BufReader<TcpStream>,
    host: String,
}

impl Http {
    fn connect(addr: &str) -> std::io::Result<Http> {
        let sa: SocketAddr = addr.parse().unwrap();
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Http { r: BufReader::new(s), host: addr.to_string() })
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
        self.request("GET", path, headers)
    }

    fn request(&mut self, method: &str, path: &str, headers: &[(&str, &str)]) -> std::io::Result<(u16, String)> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.r.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before the status line"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut len = 0usize;
        loop {
            line.clear();
            self.r.read_line(&mut line)?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(std::io::Error::other)?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.r.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn admin(path: &str) -> String {
    Http::connect(ADMIN).and_then(|mut c| c.get(path, &[])).expect("admin API").1
}

/// Keep-alive clients running until stopped (or 60,000 requests / 30 s each, whichever first).
struct Load {
    stop: Arc<AtomicBool>,
    /// Set when every answer from now on must be `expect`.
    strict: Arc<AtomicBool>,
    failures: Arc<AtomicU64>,
    unexpected: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(clients: usize, expect: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let strict = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicU64::new(0));
        let unexpected = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, strict, failures, unexpected, total) =
                    (stop.clone(), strict.clone(), failures.clone(), unexpected.clone(), total.clone());
                thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut c = Http::connect(SERVICE).expect("connect through the redirect");
                    for _ in 0..60_000 {
                        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                            return;
                        }
                        let must = strict.load(Ordering::Relaxed);
                        match c.get("/", &[]) {
                            Ok((200, body)) => {
                                if must && body != expect {
                                    unexpected.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            _ => {
                                failures.fetch_add(1, Ordering::Relaxed);
                                if let Ok(n) = Http::connect(SERVICE) {
                                    c = n;
                                }
                            }
                        }
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load { stop, strict, failures, unexpected, total, threads }
    }

    /// (requests, failures, unexpected answers while strict)
    fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.total.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.unexpected.load(Ordering::Relaxed),
        )
    }
}

/// Time until a fresh connection gets `want` 20 times in a row, bounded by `limit`.
fn time_until_all(want: &str, since: Instant, limit: Duration) -> Duration {
    loop {
        let mut c = Http::connect(SERVICE).unwrap();
        if (0..20).all(|_| c.get("/", &[]).map(|r| r.1 == want).unwrap_or(false)) {
            return since.elapsed();
        }
        assert!(since.elapsed() < limit * 3, "never switched to {want}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn file_config(rules: &str) -> String {
    format!(
        "admin: {{ address: {ADMIN} }}
outbound_policy: allow_any
listeners:
  - {{ name: virtual, address: 0.0.0.0:15000 }}
routes:
  - name: reviews
    destinations: [\"reviews:9080\", \"{SERVICE}\", \"{SERVICE_V6}\"]
    protocol: http
    rules:
{rules}
  - name: dead
    destinations: [\"10.200.100.9:80\"]
    rules: [{{ clusters: [{{ name: dead }}] }}]
clusters:
  - {{ name: v1, connect_timeout: 1s }}
  - {{ name: v2, lb_policy: least_request, connect_timeout: 1s }}
  - {{ name: v3, lb_policy: random, connect_timeout: 1s }}
  - {{ name: dead, connect_timeout: 1s }}
endpoints:
  - {{ cluster: v1, addresses: [\"{V1}\"] }}
  - {{ cluster: v2, addresses: [\"{V2}\"] }}
  - {{ cluster: v3, addresses: [\"{V3}\"] }}
  - {{ cluster: dead, addresses: [\"{DEAD}\"] }}
"
    )
}

const HALF_V1_V3: &str = "      - match: { headers: { end-user: jason } }
        clusters: [{ name: v2, weight: 100 }]
      - clusters: [{ name: v1, weight: 50 }, { name: v3, weight: 50 }]";
const ALL_V2: &str = "      - clusters: [{ name: v2, weight: 100 }]";

#[test]
fn proxy_split_header_route_file_reload_and_rejection() {
    if !privileged("proxy_split_header_route_file_reload_and_rejection") {
        return;
    }
    let mesh = Mesh::start("pxa", &file_config(HALF_V1_V3));
    mesh.net.pod.run(|| {
        // 50/50 on one keep-alive connection, per request.
        let mut c = Http::connect(SERVICE).unwrap();
        let (mut v1, mut v3) = (0, 0);
        for _ in 0..2_000 {
            match c.get("/", &[]).unwrap() {
                (200, b) if b == "v1" => v1 += 1,
                (200, b) if b == "v3" => v3 += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        eprintln!("split over 2,000 requests on one connection: v1 {v1}, v3 {v3}");
        assert!((900..=1_100).contains(&v1), "v1 {v1}, v3 {v3}");

        // The header route, on the same connection.
        for _ in 0..50 {
            assert_eq!(c.get("/", &[("end-user", "jason")]).unwrap(), (200, "v2".to_string()));
        }

        // 100% v2 by editing the file, under load, with no failed request.
        let load = Load::start(4, "v2");
        thread::sleep(Duration::from_millis(300));
        let edited = Instant::now();
        mesh.write_config(&file_config(ALL_V2));
        let took = time_until_all("v2", edited, Duration::from_secs(1));
        eprintln!("file edit effective after {took:?}");
        assert!(took < Duration::from_secs(1), "switch took {took:?}");
        load.strict.store(true, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(300));

        // An invalid update: rejected, visible, and v2 keeps answering.
        mesh.write_config(&file_config(ALL_V2).replace("protocol: http", "protocl: http"));
        let dump = wait_until(Duration::from_secs(5), "the rejection in /config_dump", || {
            let d = admin("/config_dump");
            d.contains("unknown field `protocl`").then_some(d)
        });
        assert!(dump.contains("line 8"), "{dump}");
        thread::sleep(Duration::from_millis(300));
        let (total, failures, unexpected) = load.finish();
        eprintln!("{total} requests under load across the reload and the rejected update");
        assert_eq!(failures, 0, "failed requests; log:\n{}", mesh.log_text());
        assert_eq!(unexpected, 0, "answers not from v2 after the switch");
        let stats = admin("/stats/prometheus");
        assert!(stats.contains("mesh_proxy_config_updates_total{source=\"file\",result=\"rejected\"} 1"), "{stats}");
        assert!(stats.contains("mesh_proxy_config_updates_total{source=\"file\",result=\"applied\"} 1"), "{stats}");
    });
    // It ran as 1337, unprivileged.
    let status = std::fs::read_to_string(format!("/proc/{}/status", mesh.procs[3].pid())).unwrap_or_default();
    assert!(status.lines().any(|l| l.starts_with("Uid:") && l.contains("1337")), "{status}");
}

#[test]
fn proxy_discovery_switch_and_nack() {
    if !privileged("proxy_discovery_switch_and_nack") {
        return;
    }
    // The file has only the admin address and the discovery source; python's http.server serves
    // a directory of JSON files in the pod.
    let yaml = format!(
        "admin: {{ address: {ADMIN} }}\ndiscovery: {{ url: \"http://127.0.0.1:8500/mesh\", poll_interval: 100ms }}\n"
    );
    let mut mesh = Mesh::start("pxd", &yaml);
    let xds = mesh.dir.path().join("xds");
    let v1dir = xds.join("mesh").join("v1");
    std::fs::create_dir_all(&v1dir).unwrap();
    let res = |version: &str, body: &str| format!("{{\"version_info\": \"{version}\", \"resources\": {body}}}");
    write_atomic(&v1dir.join("listeners"), &res("1", "[{\"name\": \"virtual\", \"address\": \"0.0.0.0:15000\"}]"));
    write_atomic(&v1dir.join("clusters"), &res("1", "[{\"name\": \"v1\"}, {\"name\": \"v2\"}]"));
    write_atomic(
        &v1dir.join("endpoints"),
        &res("1", &format!("[{{\"cluster\": \"v1\", \"addresses\": [\"{V1}\"]}}, {{\"cluster\": \"v2\", \"addresses\": [\"{V2}\"]}}]")),
    );
    let routes = |version: &str, cluster: &str| {
        res(version, &format!("[{{\"name\": \"reviews\", \"destinations\": [\"{SERVICE}\"], \"protocol\": \"http\", \"rules\": [{{\"clusters\": [{{\"name\": \"{cluster}\", \"weight\": 100}}]}}]}}]"))
    };
    write_atomic(&v1dir.join("routes"), &routes("1", "v1"));
    let mut server = mesh.net.pod.command("python3");
    server.args(["-u", "-m", "http.server", "8500", "--bind", "127.0.0.1"]).current_dir(&xds).stderr(Stdio::null());
    let server = Proc::spawn(&mut server);
    mesh.procs.push(server);

    mesh.net.pod.run(|| {
        wait_until(Duration::from_secs(10), "the discovered config serving v1", || {
            Http::connect(SERVICE).and_then(|mut c| c.get("/", &[])).ok().filter(|r| r.1 == "v1")
        });
        assert!(admin("/config_dump").contains("rds=1"));
        let load = Load::start(4, "v2");
        thread::sleep(Duration::from_millis(300));
        let changed = Instant::now();
        write_atomic(&v1dir.join("routes"), &routes("2", "v2"));
        let took = time_until_all("v2", changed, Duration::from_secs(1));
        eprintln!("discovery change effective after {took:?}");
        assert!(took < Duration::from_secs(1), "switch took {took:?}");
        load.strict.store(true, Ordering::Relaxed);

        // A NACK: a route naming a cluster that does not exist.
        write_atomic(&v1dir.join("routes"), &routes("3", "nope"));
        let dump = wait_until(Duration::from_secs(5), "the discovery rejection", || {
            let d = admin("/config_dump");
            d.contains("rds=3").then_some(d)
        });
        assert!(dump.contains("\\\"nope\\\" is not defined"), "{dump}");
        thread::sleep(Duration::from_millis(300));
        let (total, failures, unexpected) = load.finish();
        eprintln!("{total} requests under load across the discovery switch and the NACK");
        assert_eq!((failures, unexpected), (0, 0));
    });
}

#[test]
fn proxy_passthrough_inbound_dead_backend_registry_only() {
    if !privileged("proxy_passthrough_inbound_dead_backend_registry_only") {
        return;
    }
    let mut mesh = Mesh::start("pxp", &file_config(ALL_V2));
    // Unknown destinations on the remote: an HTTP server and a server-first protocol.
    let remote_http = format!("{REMOTE_V4}:8081");
    mesh.backend_remote("remote-http", &remote_http);
    let remote_http_v6 = format!("[{REMOTE_V6}]:8082");
    mesh.backend_remote("remote-http-v6", &remote_http_v6);
    let mut greeter = Proc::spawn(mesh.net.remote.command("python3").args(["-c", GREETER_PY, REMOTE_V4, "2525"]));
    greeter.wait_for_line("ready");
    mesh.procs.push(greeter);
    // The pod's own application, for inbound traffic (dual-stack: `::`).
    let mut app =
        Proc::spawn(mesh.net.pod.command("python3").arg(script("name_server.py")).args(["pod-app", "::", "9999"]));
    app.wait_for_line("ready");
    mesh.procs.push(app);

    mesh.net.pod.run(|| {
        // Passthrough of an unrouted HTTP destination.
        let mut c = Http::connect(&remote_http).unwrap();
        assert_eq!(c.get("/", &[]).unwrap(), (200, "remote-http".to_string()));
        // IPv6: passthrough, and a route by the IPv6 original destination (IP6T_SO_ORIGINAL_DST).
        let mut c = Http::connect(&remote_http_v6).unwrap();
        assert_eq!(c.get("/", &[]).unwrap(), (200, "remote-http-v6".to_string()));
        let mut c = Http::connect(SERVICE_V6).unwrap();
        assert_eq!(c.get("/", &[]).unwrap(), (200, "v2".to_string()));
        // Passthrough of a server-first protocol: the greeting arrives without the client
        // sending anything (no detection on unrouted traffic).
        let mut s = TcpStream::connect(format!("{REMOTE_V4}:2525")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut greeting = [0u8; 19];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"220 greeter ready\r\n");
        s.write_all(b"QUIT\r\n").unwrap();
        let mut rest = String::new();
        s.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "221 bye\r\n");
        let stats = admin("/stats/prometheus");
        assert!(
            stats.contains("mesh_proxy_tcp_connections_total{route=\"passthrough\",cluster=\"PassthroughCluster\"} 3"),
            "all three went through the proxy: {stats}"
        );

        // A dead backend: 503, then the proxy recovers when it comes back.
        let mut d = Http::connect("10.200.100.9:80").unwrap();
        let (status, body) = d.get("/", &[]).unwrap();
        assert_eq!((status, body.as_str()), (503, "no healthy upstream"));
    });
    assert!(mesh.log_text().contains("upstream connect failed"), "reason logged: {}", mesh.log_text());
    mesh.backend_remote("revived", DEAD);
    mesh.net.pod.run(|| {
        let mut d = Http::connect("10.200.100.9:80").unwrap();
        assert_eq!(d.get("/", &[]).unwrap(), (200, "revived".to_string()));
    });

    // Inbound: the remote calls the pod's address; the proxy hands it to the local app.
    let inbound = mesh.net.remote.run(|| Http::connect(&format!("{POD_V4}:9999")).and_then(|mut c| c.get("/", &[])));
    assert_eq!(inbound.unwrap(), (200, "pod-app".to_string()));
    // IPv6 inbound: no ::6 on lo here, so the proxy reaches the app over ::1 (no loop).
    let inbound6 = mesh.net.remote.run(|| Http::connect(&format!("[{POD_V6}]:9999")).and_then(|mut c| c.get("/", &[])));
    assert_eq!(inbound6.unwrap(), (200, "pod-app".to_string()));
    mesh.net.pod.run(|| {
        let stats = admin("/stats/prometheus");
        assert!(
            stats.contains(
                "mesh_proxy_tcp_connections_total{route=\"inbound\",cluster=\"InboundPassthroughCluster\"} 2"
            ),
            "{stats}"
        );

        // registry_only: the unknown destination is refused; routed traffic still flows.
        mesh.write_config(&file_config(ALL_V2).replace("allow_any", "registry_only"));
        wait_until(Duration::from_secs(5), "registry_only applied", || {
            admin("/config_dump").contains("\"registry_only\"").then_some(())
        });
        let refused = Http::connect(&remote_http).and_then(|mut c| c.get("/", &[]));
        assert!(refused.is_err(), "passed through under registry_only: {refused:?}");
        assert_eq!(Http::connect(SERVICE).unwrap().get("/", &[]).unwrap(), (200, "v2".to_string()));
    });
}

/// Istio's `PASSTHROUGH` load balancer (Envoy's ORIGINAL_DST cluster): a route whose cluster is
/// `lb_policy: passthrough` sends each connection or request to the address the application
/// dialled, counted under the route and that cluster, even under `registry_only` (which refuses
/// the same destinations when no route claims them).
#[test]
fn proxy_passthrough_cluster_goes_to_the_original_destination() {
    if !privileged("proxy_passthrough_cluster_goes_to_the_original_destination") {
        return;
    }
    let config = format!(
        "admin: {{ address: {ADMIN} }}
outbound_policy: registry_only
listeners: [{{ name: virtual, address: 0.0.0.0:15000 }}]
routes:
  - {{ name: direct, destinations: [\"{V1}\"], protocol: http, rules: [{{ clusters: [{{ name: orig }}] }}] }}
  - {{ name: direct-tcp, destinations: [\"{V2}\"], protocol: tcp, rules: [{{ clusters: [{{ name: orig }}] }}] }}
clusters: [{{ name: orig, lb_policy: passthrough, connect_timeout: 1s }}]
"
    );
    let mesh = Mesh::start("pxo", &config);
    mesh.net.pod.run(|| {
        let mut c = Http::connect(V1).unwrap();
        for _ in 0..3 {
            assert_eq!(c.get("/", &[]).unwrap(), (200, "v1".to_string()));
        }
        assert_eq!(Http::connect(V2).unwrap().get("/", &[]).unwrap(), (200, "v2".to_string()));
        // No route for v3: refused.
        assert!(Http::connect(V3).and_then(|mut c| c.get("/", &[])).is_err());
        let stats = admin("/stats/prometheus");
        assert!(
            stats.contains("mesh_proxy_requests_total{route=\"direct\",cluster=\"orig\",response_class=\"2xx\"} 3"),
            "{stats}"
        );
        assert!(stats.contains("mesh_proxy_tcp_connections_total{route=\"direct-tcp\",cluster=\"orig\"} 1"), "{stats}");
    });
}

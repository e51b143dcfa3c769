//! What meshed applications speak, through the real mesh-proxy behind real mesh-init rules, in
//! both interception modes where the mode supports the feature: WebSocket (python `websockets`)
//! through `http` and `auto` routes and through passthrough; HTTP/2 (`h2load`, `nghttp`) and gRPC
//! (python `grpcio`) split per stream over one connection, header rules per stream, streaming
//! calls, and the proxy's errors as gRPC statuses.
//!
//! A pod namespace (in its own cgroup, which the eBPF mode attaches to) runs mesh-proxy as UID 1337
//! and the clients; the servers run in the remote namespace. The application dials service
//! addresses that exist nowhere: only the proxy's routing makes them answer.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::Duration,
};

use mesh_e2e::{bin, script, PodNet, REMOTE_V4};
use mesh_lab::{check, privileged, try_wait_until, Cgroup, Proc, TempDir};

const ADMIN: &str = "127.0.0.1:15090";
/// Service addresses the application dials (nothing listens there).
const SVC_HTTP: &str = "10.200.100.1:9080";
const SVC_AUTO: &str = "10.200.100.2:9080";
/// The backends' addresses, on the remote.
const V1: &str = "10.200.1.1";
const V2: &str = "10.200.1.2";
/// A remote address where nothing listens (connections are refused at once).
const DEAD: &str = "10.200.1.9";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Iptables,
    Ebpf,
}

/// The pod with mesh-init's rules and mesh-proxy, the remote with the servers.
struct Mesh {
    mode: Mode,
    procs: Vec<Proc>,
    dir: TempDir,
    cgroup: Cgroup,
    net: PodNet,
}

impl Mesh {
    fn start(mode: Mode, tag: &str, config: &str) -> Mesh {
        let net = PodNet::new(tag);
        for ip in [V1, V2, DEAD] {
            net.add_remote_addr(&format!("{ip}/32"));
        }
        let mesh = Mesh { mode, procs: Vec::new(), dir: TempDir::new(tag), cgroup: Cgroup::new(tag), net };
        mesh.mesh_init(&[]);
        let mut mesh = mesh;
        let config_path = mesh.dir.write("proxy.yaml", &format!("admin: {{ address: {ADMIN} }}\n{config}"));
        let mut cmd = mesh.pod_cmd(1337, 1337, bin("mesh-proxy"));
        cmd.arg("--config").arg(&config_path).args(["--workers", "1", "--log-level", "info"]);
        cmd.stderr(std::fs::File::create(mesh.log_path()).unwrap());
        mesh.procs.push(Proc::spawn(&mut cmd));
        let ready = mesh.net.pod.run(|| {
            try_wait_until(Duration::from_secs(10), "mesh-proxy's /ready", || Ok(admin("/ready").ok().map(|_| ())))
        });
        if let Err(e) = ready {
            panic!("{e:#}; log:\n{}", mesh.log());
        }
        mesh
    }

    fn mesh_init(&self, extra: &[&str]) {
        let mut cmd = Command::new(bin("mesh-init"));
        match self.mode {
            Mode::Iptables => {
                cmd.args(["iptables", "--netns", self.net.pod.name()]);
                cmd.args(["-p", "15000", "-z", "15000", "-i", "*", "-b", "*", "-u", "1337", "-d", "15090"]);
            }
            Mode::Ebpf => {
                cmd.arg("ebpf").arg("--cgroup").arg(self.cgroup.path()).args(["--netns", self.net.pod.name()]);
                cmd.args(["-p", "15000", "-i", "*", "-b", "*", "-d", "15090"]);
            }
        }
        check(cmd.args(extra));
    }

    /// A command in the pod's namespace and cgroup as `uid`/`gid`.
    fn pod_cmd(&self, uid: u32, gid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.net.pod.command_as(uid, gid, program);
        self.cgroup.enter(&mut cmd);
        cmd
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A python helper from `tests/py` on the remote, started and waited for (`ready`).
    fn remote_py(&mut self, script_name: &str, args: &[&str]) {
        let mut p = Proc::spawn(self.net.remote.command("python3").arg(script(script_name)).args(args));
        p.wait_for_line("ready");
        self.procs.push(p);
    }

    /// A python helper from `tests/py` run to its end in the pod as the application (root, in
    /// the cgroup); its stdout.
    fn app_py(&self, script_name: &str, args: &[&str]) -> String {
        let out = check(self.pod_cmd(0, 0, "python3").arg(script(script_name)).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn admin(&self, path: &str) -> String {
        self.net.pod.run(|| admin(path)).unwrap_or_else(|e| panic!("admin {path}: {e}"))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.procs.clear();
        if self.mode == Mode::Ebpf {
            self.mesh_init(&["--cleanup-only"]);
        }
    }
}

/// GET on the admin API (from inside the pod); the body of a 200.
fn admin(path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&ADMIN.parse().unwrap(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(std::io::Error::other(format!("unexpected answer {text:?}"))),
    }
}

fn websocket(mode: Mode, tag: &str) {
    let config = format!(
        "listeners: [{{ name: virtual, address: 0.0.0.0:15000 }}]
routes:
  - name: ws-http
    destinations: [\"{SVC_HTTP}\"]
    protocol: http
    rules:
      - match: {{ headers: {{ x-ver: v2 }} }}
        clusters: [{{ name: v2 }}]
      - clusters: [{{ name: v1 }}]
  - name: ws-auto
    destinations: [\"{SVC_AUTO}\"]
    rules: [{{ clusters: [{{ name: v2 }}] }}]
  # A host route on the passthrough server's first port makes that port detected; the
  # port-less one must not make every port detected.
  - name: other-host
    destinations: [\"other.example:8765\", \"ratings\"]
    rules: [{{ clusters: [{{ name: v1 }}] }}]
clusters: [{{ name: v1 }}, {{ name: v2 }}]
endpoints:
  - {{ cluster: v1, addresses: [\"{V1}:8080\"] }}
  - {{ cluster: v2, addresses: [\"{V2}:8080\"] }}
"
    );
    let mut mesh = Mesh::start(mode, tag, &config);
    mesh.remote_py("ws_echo.py", &["v1", V1, "8080"]);
    mesh.remote_py("ws_echo.py", &["v2", V2, "8080"]);
    mesh.remote_py("ws_echo.py", &["outside", REMOTE_V4, "8765"]);
    mesh.remote_py("ws_echo.py", &["outside-2", REMOTE_V4, "8766"]);
    let ws = |addr: &str, headers: &[&str]| {
        let mut args = vec![format!("ws://{addr}/chat")];
        args.extend(headers.iter().map(|h| h.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        mesh.app_py("ws_client.py", &args)
    };
    let echoed = |name: &str| format!("{name} /chat\none\ntwo\n");
    assert_eq!(ws(SVC_HTTP, &[]), echoed("v1"), "http route, default rule");
    assert_eq!(ws(SVC_HTTP, &["x-ver=v2"]), echoed("v2"), "http route, header rule on the handshake");
    assert_eq!(ws(SVC_AUTO, &[]), echoed("v2"), "auto route");
    assert_eq!(ws(&format!("{REMOTE_V4}:8765"), &[]), echoed("outside"), "passthrough on a detected port");
    assert_eq!(ws(&format!("{REMOTE_V4}:8766"), &[]), echoed("outside-2"), "passthrough as TCP");
    let stats = mesh.admin("/stats/prometheus");
    assert!(
        stats.contains("mesh_proxy_tcp_connections_total{route=\"passthrough\",cluster=\"PassthroughCluster\"} 1"),
        "only the undetected port went through as TCP: {stats}"
    );
    // Access lines may be written in batches: wait for the four tunnels' lines.
    let tunnels = |log: &str| log.lines().filter(|l| l.contains("tunnel") && l.contains("received")).count();
    let found = try_wait_until(Duration::from_secs(3), "a tunnel line per upgraded connection", || {
        Ok((tunnels(&mesh.log()) == 4).then_some(()))
    });
    assert!(found.is_ok(), "one tunnel line per upgraded connection:\n{}", mesh.log());
}

#[test]
fn websocket_through_http_auto_and_passthrough_iptables() {
    if !privileged("websocket_through_http_auto_and_passthrough_iptables") {
        return;
    }
    websocket(Mode::Iptables, "wsi");
}

#[test]
fn websocket_through_http_auto_and_passthrough_ebpf() {
    if !privileged("websocket_through_http_auto_and_passthrough_ebpf") {
        return;
    }
    websocket(Mode::Ebpf, "wse");
}

/// `name="value"` label pairs → the value of that series in a Prometheus text exposition.
fn series(stats: &str, name: &str, labels: &str) -> u64 {
    let prefix = format!("{name}{{{labels}}} ");
    stats.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn h2_and_grpc(mode: Mode, tag: &str) {
    let config = format!(
        "listeners: [{{ name: virtual, address: 0.0.0.0:15000 }}]
routes:
  - name: h2
    destinations: [\"{SVC_HTTP}\"]
    protocol: http
    rules:
      - match: {{ headers: {{ x-ver: v2 }} }}
        clusters: [{{ name: v2 }}]
      - clusters: [{{ name: v1, weight: 50 }}, {{ name: v2, weight: 50 }}]
  - name: grpc
    destinations: [\"{SVC_AUTO}\"]
    rules:
      - match: {{ headers: {{ x-ver: v2 }} }}
        clusters: [{{ name: g2 }}]
      - clusters: [{{ name: g1, weight: 50 }}, {{ name: g2, weight: 50 }}]
  - name: grpc-dead
    destinations: [\"10.200.100.9:9080\"]
    rules: [{{ clusters: [{{ name: dead }}] }}]
clusters:
  - {{ name: v1 }}
  - {{ name: v2 }}
  - {{ name: g1, protocol: http2 }}
  - {{ name: g2, protocol: auto }}
  - {{ name: dead, protocol: http2, connect_timeout: 1s }}
endpoints:
  - {{ cluster: v1, addresses: [\"{V1}:8080\"] }}
  - {{ cluster: v2, addresses: [\"{V2}:8080\"] }}
  - {{ cluster: g1, addresses: [\"{V1}:50051\"] }}
  - {{ cluster: g2, addresses: [\"{V2}:50051\"] }}
  - {{ cluster: dead, addresses: [\"{DEAD}:50051\"] }}
"
    );
    let mut mesh = Mesh::start(mode, tag, &config);
    for (name, ip) in [("v1", V1), ("v2", V2)] {
        mesh.remote_py("name_server.py", &[name, ip, "8080"]);
    }
    for (name, ip) in [("g1", V1), ("g2", V2)] {
        mesh.remote_py("grpc_echo.py", &["serve", name, ip, "50051"]);
    }
    let run = |program: &str, args: &[&str]| {
        let out = check(mesh.pod_cmd(0, 0, program).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // h2load: 2,000 requests on ONE connection (10 streams at a time) to HTTP/1.1 backends.
    let url = format!("http://{SVC_HTTP}/");
    let out = run("h2load", &["-n", "2000", "-c", "1", "-m", "10", &url]);
    assert!(out.contains("2000 succeeded"), "{out}");
    assert!(out.contains("h2c"), "HTTP/2 prior knowledge: {out}");
    let stats = mesh.admin("/stats/prometheus");
    let count = |cluster: &str| {
        series(
            &stats,
            "mesh_proxy_requests_total",
            &format!("route=\"h2\",cluster=\"{cluster}\",response_class=\"2xx\""),
        )
    };
    let (v1, v2) = (count("v1"), count("v2"));
    eprintln!("h2load, one connection: v1 {v1}, v2 {v2}");
    assert_eq!(v1 + v2, 2000, "{stats}");
    assert!((900..=1100).contains(&v1), "50/50 within ±5% over one connection: v1 {v1}, v2 {v2}");
    // nghttp: a header rule per stream, four streams on one connection.
    let urls: Vec<String> = (1..=4).map(|i| format!("{url}{i}")).collect();
    let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
    assert_eq!(run("nghttp", &[&["-H", "x-ver: v2"], &urls[..]].concat()), "v2v2v2v2");

    // gRPC: one channel, 2,000 unary calls split 50/50, then streaming of every kind.
    let target = SVC_AUTO.to_string();
    let calls = |metadata: &[&str]| {
        let mut cmd = mesh.pod_cmd(0, 0, "python3");
        cmd.arg(script("grpc_echo.py")).args(["call", &target]).args(metadata);
        String::from_utf8_lossy(&check(&mut cmd).stdout).into_owned()
    };
    let split = calls(&["2000"]);
    eprintln!("grpc, one channel: {split}");
    let g1: u64 = split
        .split("\"g1\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((900..=1100).contains(&g1), "50/50 within ±5% over one channel: {split}");
    assert!(split.contains("\"client_stream\": \"g"), "{split}");
    let v2 = calls(&["20", "x-ver=v2"]);
    assert!(v2.contains("\"unary\": {\"g2\": 20}"), "header rule per call: {v2}");
    assert!(v2.contains("\"server_stream\": [\"g2 0\", \"g2 1\", \"g2 2\"]"), "{v2}");
    assert!(v2.contains("\"client_stream\": \"g2 4\""), "{v2}");
    assert!(v2.contains("\"bidi\": [\"g2 x\", \"g2 y\"]"), "{v2}");
    let stats = mesh.admin("/stats/prometheus");
    assert!(
        series(&stats, "mesh_proxy_downstream_connections_total", "listener=\"virtual\"") <= 4,
        "h2load, nghttp and the two channels each used one connection: {stats}"
    );
    // No healthy upstream: the gRPC client reads UNAVAILABLE with the proxy's reason.
    let status =
        run("python3", &[&script("grpc_echo.py").display().to_string(), "status", "10.200.100.9:9080", "Unary", "5"]);
    assert_eq!(status.trim(), "UNAVAILABLE no healthy upstream");
}

#[test]
fn http2_and_grpc_split_per_stream_iptables() {
    if !privileged("http2_and_grpc_split_per_stream_iptables") {
        return;
    }
    h2_and_grpc(Mode::Iptables, "h2i");
}

#[test]
fn http2_and_grpc_split_per_stream_ebpf() {
    if !privileged("http2_and_grpc_split_per_stream_ebpf") {
        return;
    }
    h2_and_grpc(Mode::Ebpf, "h2e");
}

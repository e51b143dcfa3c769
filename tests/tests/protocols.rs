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

use mesh_e2e::{bin, script, PodNet, REMOTE_V4, REMOTE_V6};
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
    /// Namespaces, mesh-init's rules, mesh-proxy with `config`.
    fn start(mode: Mode, tag: &str, config: &str) -> Mesh {
        let mut mesh = Mesh::new(mode, tag);
        mesh.mesh_init(&[]);
        mesh.start_proxy(config, 1337, &[]);
        mesh
    }

    /// The namespaces (and the cgroup), nothing installed yet.
    fn new(mode: Mode, tag: &str) -> Mesh {
        let net = PodNet::new(tag);
        for ip in [V1, V2, DEAD] {
            net.add_remote_addr(&format!("{ip}/32"));
        }
        Mesh { mode, procs: Vec::new(), dir: TempDir::new(tag), cgroup: Cgroup::new(tag), net }
    }

    /// mesh-proxy in the pod as `uid` (group 1337) with `config`, through `wrapper` (e.g.
    /// `setpriv` with capabilities); waits for `/ready`.
    fn start_proxy(&mut self, config: &str, uid: u32, wrapper: &[&str]) {
        let config_path = self.dir.write("proxy.yaml", &format!("admin: {{ address: {ADMIN} }}\n{config}"));
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = self.pod_cmd(uid, 1337, program);
                c.args(args).arg(bin("mesh-proxy"));
                c
            }
            None => self.pod_cmd(uid, 1337, bin("mesh-proxy")),
        };
        cmd.arg("--config").arg(&config_path).args(["--workers", "1", "--log-level", "info"]);
        cmd.stderr(std::fs::File::create(self.log_path()).unwrap());
        self.procs.push(Proc::spawn(&mut cmd));
        let ready = self.net.pod.run(|| {
            try_wait_until(Duration::from_secs(10), "mesh-proxy's /ready", || Ok(admin("/ready").ok().map(|_| ())))
        });
        if let Err(e) = ready {
            panic!("{e:#}; log:\n{}", self.log());
        }
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

/// What the outside nameserver (in the remote namespace) answers for every name.
const REAL_A: &str = "10.99.0.2";
const REAL_AAAA: &str = "fd00:99::2";
/// The service name the config gives virtual addresses.
const SVC_NAME: &str = "reviews.default.svc.cluster.local";
const SVC_V4: &str = "10.200.100.1";
const SVC_V6: &str = "fd00:200:100::1";
const SEARCH: &str = "search default.svc.cluster.local svc.cluster.local cluster.local\n";

/// `/etc/netns/<pod>/`, which `ip netns exec` mounts over /etc for what it runs; removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn new(netns: &str) -> NetnsEtc {
        let dir = PathBuf::from("/etc/netns").join(netns);
        std::fs::create_dir_all(&dir).unwrap();
        NetnsEtc(dir)
    }

    fn resolv_conf(&self, text: &str) -> PathBuf {
        let path = self.0.join("resolv.conf");
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `argv` in the pod with the pod's resolv.conf (`ip netns exec`), as `uid`; its stdout.
fn in_pod(pod: &str, uid: u32, argv: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", pod, "setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]);
    let out = check(cmd.arg("--").args(argv));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The addresses glibc's getaddrinfo (python's socket module) gives for `name` in the pod.
fn getaddrinfo(pod: &str, name: &str) -> String {
    let code = format!(
        "import socket\nprint(' '.join(sorted({{a[4][0] for a in socket.getaddrinfo('{name}', 80, socket.AF_UNSPEC, \
         socket.SOCK_STREAM)}})))"
    );
    in_pod(pod, 0, &["python3", "-c", &code])
}

#[test]
fn dns_proxy_answers_the_mesh_and_forwards_the_rest_iptables() {
    if !privileged("dns_proxy_answers_the_mesh_and_forwards_the_rest_iptables") {
        return;
    }
    let mut mesh = Mesh::new(Mode::Iptables, "dnp");
    let pod = mesh.net.pod.name().to_string();
    let etc = NetnsEtc::new(&pod);
    // mesh-init captures DNS to the nameservers of the pod's resolv.conf (Istio's rule).
    let resolv = etc.resolv_conf(&format!("{SEARCH}nameserver {REMOTE_V4}\nnameserver {REMOTE_V6}\noptions ndots:1\n"));
    mesh.mesh_init(&["--dual-stack", "--redirect-dns"]);
    let config = format!(
        "dns: {{ resolv_conf: \"{}\" }}\nhosts:\n  - {{ name: {SVC_NAME}, addresses: [{SVC_V4}, \"{SVC_V6}\"] }}\n",
        resolv.display()
    );
    mesh.start_proxy(&config, 1337, &[]);
    let mut outside = Proc::spawn(
        mesh.net
            .remote
            .command("python3")
            .arg(script("dns_server.py"))
            .args(["53", REAL_A, REAL_AAAA, REMOTE_V4, REMOTE_V6]),
    );
    outside.wait_for_line("ready");

    for (server, transport) in [(REMOTE_V4, "udp"), (REMOTE_V4, "tcp"), (REMOTE_V6, "udp"), (REMOTE_V6, "tcp")] {
        // glibc asks the one nameserver listed; `use-vc` makes it use TCP.
        let options = if transport == "tcp" { "options ndots:1 use-vc\n" } else { "options ndots:1\n" };
        etc.resolv_conf(&format!("{SEARCH}nameserver {server}\n{options}"));
        let case = format!("nameserver {server} over {transport}");
        let first = |out: String| out.split_whitespace().next().unwrap_or("").to_string();
        assert_eq!(first(in_pod(&pod, 0, &["getent", "ahostsv4", "reviews"])), SVC_V4, "{case}: the short name");
        assert_eq!(first(in_pod(&pod, 1000, &["getent", "ahostsv6", "reviews.default"])), SVC_V6, "{case}");
        assert_eq!(first(in_pod(&pod, 0, &["getent", "hosts", SVC_NAME])), SVC_V6, "{case}: the full name");
        assert_eq!(getaddrinfo(&pod, "reviews"), format!("{SVC_V4} {SVC_V6}"), "{case}: getaddrinfo");
        assert_eq!(first(in_pod(&pod, 0, &["getent", "ahostsv4", "www.outside.test"])), REAL_A, "{case}: outside");
        assert_eq!(getaddrinfo(&pod, "www.outside.test"), format!("{REAL_A} {REAL_AAAA}"), "{case}: outside");
    }
    // Truncated over UDP upstream: the proxy asks again over TCP, the client gets the answer.
    let dig =
        |name: &str| in_pod(&pod, 0, &["dig", &format!("@{REMOTE_V4}"), name, "A", "+short", "+notcp", "+tries=1"]);
    assert_eq!(dig("tc.outside.test"), REAL_A);
    outside.wait_for_line("tcp tc.outside.test A");
    let stats = mesh.admin("/stats/prometheus");
    let dns = |transport: &str, answer: &str| {
        series(&stats, "mesh_proxy_dns_queries_total", &format!("transport=\"{transport}\",answer=\"{answer}\""))
    };
    eprintln!(
        "dns: local {}/{}, cache {}/{}, upstream {}/{}",
        dns("udp", "local"),
        dns("tcp", "local"),
        dns("udp", "cache"),
        dns("tcp", "cache"),
        dns("udp", "upstream"),
        dns("tcp", "upstream")
    );
    assert!(dns("udp", "local") >= 8 && dns("tcp", "local") >= 8, "the mesh's names from the config: {stats}");
    assert!(dns("udp", "upstream") + dns("tcp", "upstream") >= 2, "the outside names from upstream: {stats}");
    assert!(dns("udp", "cache") + dns("tcp", "cache") >= 1, "the outside name asked again within its TTL: {stats}");
}

/// What `mesh-init inject --redirect-dns` writes: the capture's `--redirect-dns` and the proxy's
/// `MESH_PROXY_DNS_CAPTURE`, with a config that has no `dns` section. Before the injector set the
/// variable, nothing listened on 15053 and every lookup in the pod failed.
#[test]
fn dns_capture_as_injected_answers_in_the_pod() {
    if !privileged("dns_capture_as_injected_answers_in_the_pod") {
        return;
    }
    let mut mesh = Mesh::new(Mode::Iptables, "dni");
    let pod = mesh.net.pod.name().to_string();
    let etc = NetnsEtc::new(&pod);
    etc.resolv_conf(&format!("{SEARCH}nameserver {REMOTE_V4}\noptions ndots:1 timeout:1 attempts:1\n"));
    mesh.mesh_init(&["--dual-stack", "--redirect-dns"]);
    let config = format!("hosts:\n  - {{ name: {SVC_NAME}, addresses: [{SVC_V4}, \"{SVC_V6}\"] }}\n");
    mesh.start_proxy(&config, 1337, &["env", "MESH_PROXY_DNS_CAPTURE=true"]);
    let name = format!("{SVC_NAME}.");
    assert_eq!(in_pod(&pod, 0, &["getent", "ahostsv4", &name]).split_whitespace().next(), Some(SVC_V4));
    assert_eq!(getaddrinfo(&pod, &name), format!("{SVC_V4} {SVC_V6}"));
}

#[test]
fn the_ebpf_mode_refuses_dns_capture() {
    if !privileged("the_ebpf_mode_refuses_dns_capture") {
        return;
    }
    let mesh = Mesh::new(Mode::Ebpf, "dne");
    let out = Command::new(bin("mesh-init"))
        .arg("ebpf")
        .arg("--cgroup")
        .arg(mesh.cgroup.path())
        .args(["--netns", mesh.net.pod.name(), "-p", "15000", "--redirect-dns"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--redirect-dns"), "{stderr}");
}

/// TPROXY (`mesh-init iptables -m TPROXY`): an inbound request over IPv4 and IPv6 reaches the
/// application through the proxy's transparent listener, and the application sees the remote
/// client's address (with REDIRECT it would see 127.0.0.6). The proxy runs as `mesh-init inject`
/// writes it in this mode (Istio's injector too): user 0 with group 1337 (the rules exempt its
/// outbound traffic by group) and only CAP_NET_ADMIN. `wrapper` adds how the proxy learns the mode;
/// `backend` is mesh-init's extra flags.
fn tproxy_inbound(tag: &str, backend: &[&str], config: &str, wrapper: &[&str]) {
    let mut mesh = Mesh::new(Mode::Iptables, tag);
    mesh.mesh_init(&[&["-m", "TPROXY", "-g", "1337", "--dual-stack"], backend].concat());
    let caps = ["setpriv", "--clear-groups", "--bounding-set=-all,+net_admin", "--inh-caps=-all", "--"];
    mesh.start_proxy(config, 0, &[wrapper, &caps].concat());
    // The application, on 0.0.0.0 and [::]: answers each connection with the peer it sees.
    let mut app = mesh.pod_cmd(0, 0, "python3");
    app.arg(script("origdst_server.py")).arg("8080");
    let mut app = Proc::spawn(&mut app);
    app.wait_for_line("ready");
    mesh.procs.push(app);
    let probe = |addr: &str| {
        let out = mesh.net.remote.command("python3").arg(script("probe.py")).args([addr, "3"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let v4 = probe(&format!("{}:8080", mesh_e2e::POD_V4));
    let v6 = probe(&format!("[{}]:8080", mesh_e2e::POD_V6));
    let log = mesh.log();
    assert!(v4.contains(&format!("peer={REMOTE_V4}:")), "the application sees the client's IPv4 address: {v4}\n{log}");
    assert!(
        v6.contains(&format!("peer=[{REMOTE_V6}]:")),
        "the application sees the client's IPv6 address: {v6}\n{log}"
    );
    let stats = mesh.admin("/stats/prometheus");
    let inbound =
        series(&stats, "mesh_proxy_tcp_connections_total", "route=\"inbound\",cluster=\"InboundPassthroughCluster\"");
    assert_eq!(inbound, 2, "both went through the proxy: {stats}\n{log}");
}

/// The listener says `transparent: true` (a config written for TPROXY).
#[test]
fn tproxy_inbound_keeps_the_client_address_by_config() {
    if !privileged("tproxy_inbound_keeps_the_client_address_by_config") {
        return;
    }
    let config = "listeners: [{ name: virtual, address: 0.0.0.0:15000, transparent: true }]\n";
    tproxy_inbound("tpc", &[], config, &[]);
}

/// The config says nothing about the mode; the environment `mesh-init inject` writes in TPROXY
/// mode (`MESH_PROXY_INBOUND_TPROXY_MARK`) makes the listener transparent. Without it (before
/// this existed) the request timed out: TPROXY drops what no transparent socket takes.
#[test]
fn tproxy_inbound_keeps_the_client_address_as_injected() {
    if !privileged("tproxy_inbound_keeps_the_client_address_as_injected") {
        return;
    }
    let config = "listeners: [{ name: virtual, address: 0.0.0.0:15000 }]\n";
    tproxy_inbound("tpi", &[], config, &["env", "MESH_PROXY_INBOUND_TPROXY_MARK=1337"]);
}

/// The same rules written by mesh-init's native nftables backend.
#[test]
fn tproxy_inbound_keeps_the_client_address_native_nftables() {
    if !privileged("tproxy_inbound_keeps_the_client_address_native_nftables") {
        return;
    }
    let config = "listeners: [{ name: virtual, address: 0.0.0.0:15000 }]\n";
    tproxy_inbound("tpn", &["--native-nftables"], config, &["env", "MESH_PROXY_INBOUND_TPROXY_MARK=1337"]);
}

#[test]
fn the_ebpf_mode_refuses_tproxy() {
    if !privileged("the_ebpf_mode_refuses_tproxy") {
        return;
    }
    let mesh = Mesh::new(Mode::Ebpf, "tpe");
    let out = Command::new(bin("mesh-init"))
        .arg("ebpf")
        .arg("--cgroup")
        .arg(mesh.cgroup.path())
        .args(["--netns", mesh.net.pod.name(), "-p", "15000", "-m", "TPROXY"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("TPROXY"), "{stderr}");
}

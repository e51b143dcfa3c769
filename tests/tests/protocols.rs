//! What meshed applications speak, through the real mesh-proxy behind real mesh-init rules, in
//! both interception modes where the mode supports the feature: WebSocket (python `websockets`)
//! through `http` and `auto` routes and through passthrough.
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
        for ip in [V1, V2] {
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

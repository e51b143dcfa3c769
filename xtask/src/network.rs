//! The benchmark's private network, built from mesh-lab's guards (which remove themselves on
//! drop, also when the harness fails or is interrupted, see [`mesh_lab::interrupt`]).
//!
//! Layout: one *backend* namespace runs nginx and an iperf3 server; every path under test gets
//! its own *pod* namespace joined to the backend by a veth pair created inside the pod namespace
//! (`10.200.K.1` pod side, `10.200.K.2` backend side). Nothing is connected to the machine's own
//! namespace. Every object is named `mesh-bench-<tag>-<pid>-<n>`, so `scripts/lib.sh`'s reaper
//! recognises leftovers of a run that was killed outright.

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::Result;
use mesh_lab::{try_wait_until, Cgroup, Netns, Proc, TempDir};

/// Waits until something accepts TCP connections on `addr` inside `ns`; fails early when `proc`,
/// the server expected there, has exited (quoting its log).
pub fn wait_listening(ns: &Netns, addr: SocketAddr, limit: Duration, proc: &mut Proc) -> Result<()> {
    let what = format!("{} to listen on {addr}", proc.name);
    try_wait_until(limit, &what, || {
        if ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()) {
            return Ok(Some(()));
        }
        proc.ensure_running().map(|()| None)
    })
}

/// A pod namespace joined to the backend: where a path's client (and sidecar) run.
pub struct Pod {
    /// Set for the eBPF paths: the client and the proxy run in it, the programs attach to it.
    /// Declared before `ns` so that it is removed first.
    pub cgroup: Option<Cgroup>,
    pub ns: Netns,
    /// The backend's address on this pod's veth: what the client dials.
    pub backend: Ipv4Addr,
}

impl Pod {
    /// `program` in the pod: its namespace and, for the eBPF paths, its cgroup.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.ns.command(program);
        if let Some(cg) = &self.cgroup {
            cg.enter(&mut c);
        }
        c
    }

    /// Like [`Pod::command`], as the proxy's user and group.
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.ns.command_as(uid, gid, program);
        if let Some(cg) = &self.cgroup {
            cg.enter(&mut c);
        }
        c
    }

    /// True when a connection from the pod to a port nothing listens on succeeds: something
    /// (a sidecar behind the interception) accepted it. A direct path gets "connection refused".
    pub fn intercepted(&self) -> Result<bool> {
        let probe = format!("exec 3<>/dev/tcp/{}/9", self.backend);
        Ok(mesh_lab::output(self.command("bash").args(["-c", &probe]), Duration::from_secs(5))?.status.success())
    }
}

/// The backend namespace with nginx and iperf3, and the subnets handed to pods.
pub struct Backend {
    // Field order is drop order: servers first, then the namespace, then their files.
    _nginx: Proc,
    _iperf: Proc,
    pub ns: Netns,
    _dir: TempDir,
    next_subnet: u8,
}

/// The nginx configuration: one worker, small fixed responses, no access log, keep-alive
/// connections never closed by request count (nginx closes after 1,000 by default, which would
/// turn the keep-alive workload into a partly reconnecting one), enough connections for the idle test.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;\nworker_rlimit_nofile 200000;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log warn;\n\
         events {{ worker_connections 60000; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
           server {{\n    listen 80 backlog=8192;\n    location / {{ default_type text/plain; return 200 \"hello from the backend\\n\"; }}\n  }}\n}}\n"
    )
}

impl Backend {
    pub fn start() -> Result<Backend> {
        let dir = TempDir::new("bench-tmp");
        let ns = Netns::new("bench-backend");
        let conf = dir.write("nginx.conf", &nginx_conf(dir.path()));
        let mut nginx = Proc::spawn_logged(
            "nginx",
            ns.command("nginx").arg("-c").arg(&conf).args(["-g", "daemon off;"]),
            &dir.path().join("nginx.log"),
        );
        let mut iperf = Proc::spawn_logged(
            "iperf3 server",
            ns.command("iperf3").args(["-s", "-p", "5201"]),
            &dir.path().join("iperf3.log"),
        );
        wait_listening(&ns, "127.0.0.1:80".parse()?, Duration::from_secs(10), &mut nginx)?;
        wait_listening(&ns, "127.0.0.1:5201".parse()?, Duration::from_secs(10), &mut iperf)?;
        Ok(Backend { _nginx: nginx, _iperf: iperf, ns, _dir: dir, next_subnet: 1 })
    }

    /// A new pod namespace with a veth pair to the backend (created inside the namespaces).
    pub fn pod(&mut self, tag: &str, cgroup: bool) -> Pod {
        let k = self.next_subnet;
        self.next_subnet += 1;
        let tag = format!("bench-{tag}");
        let ns = Netns::new(&tag);
        let peer = format!("v{k}");
        ns.veth("eth0", &self.ns, &peer);
        ns.ip(&["addr", "add", &format!("10.200.{k}.1/24"), "dev", "eth0"]);
        self.ns.ip(&["addr", "add", &format!("10.200.{k}.2/24"), "dev", &peer]);
        // Connection-per-request workloads open tens of thousands of connections a run.
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000");
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1");
        let cgroup = if cgroup { Some(Cgroup::new(&tag)) } else { None };
        Pod { cgroup, ns, backend: Ipv4Addr::new(10, 200, k, 2) }
    }
}

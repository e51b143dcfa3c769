//! The paths under test: how a client in a pod namespace reaches nginx in the backend namespace.
//!
//! Every path with a sidecar uses the same interception flags (`-p 15000 -z 15000 -i * -b *`, proxy UID 1337) and
//! runs its sidecar as UID 1337 with one data-plane thread; only the interception mechanism, the
//! proxy, and whether it writes an access line per request differ.

use std::{
    fmt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

use mesh_common::{flags, ports, PROXY_GID, PROXY_UID};
use mesh_lab::{run, Proc, TempDir};

use crate::network::{wait_listening, Backend, Pod};

/// Where intercepted connections arrive (mesh-init's default `-p`, passed explicitly).
pub const PROXY_PORT: u16 = ports::PROXY;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum PathKind {
    /// Client to nginx, no interception, no proxy: the baseline.
    Direct,
    /// HAProxy as the sidecar behind the iptables redirect.
    Haproxy,
    /// nginx as the sidecar (`proxy_pass` with upstream keep-alive) behind the iptables redirect.
    Nginx,
    /// Caddy as the sidecar (`reverse_proxy`, one Go thread) behind the iptables redirect.
    Caddy,
    /// nghttpx as the sidecar (one worker; HTTP/1.1 and prior-knowledge h2c on one port): the
    /// HTTP/2 peer.
    Nghttpx,
    /// mesh-proxy behind the iptables redirect.
    MeshProxy,
    /// mesh-proxy behind `mesh-init ebpf`.
    Ebpf,
    /// HAProxy logging every request (`option httplog` to stderr, a file).
    HaproxyLog,
    /// nginx logging every request (its default `access_log`, a file).
    NginxLog,
    /// mesh-proxy with its default access log on (stderr, a file).
    MeshProxyLog,
}

impl PathKind {
    pub const ALL: [PathKind; 10] = [
        PathKind::Direct,
        PathKind::Haproxy,
        PathKind::Nginx,
        PathKind::Caddy,
        PathKind::Nghttpx,
        PathKind::MeshProxy,
        PathKind::Ebpf,
        PathKind::HaproxyLog,
        PathKind::NginxLog,
        PathKind::MeshProxyLog,
    ];

    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::Haproxy => "haproxy (iptables)",
            PathKind::Nginx => "nginx (iptables)",
            PathKind::Caddy => "caddy (iptables)",
            PathKind::Nghttpx => "nghttpx (iptables)",
            PathKind::MeshProxy => "mesh-proxy (iptables)",
            PathKind::Ebpf => "mesh-proxy (eBPF)",
            PathKind::HaproxyLog => "haproxy + access log",
            PathKind::NginxLog => "nginx + access log",
            PathKind::MeshProxyLog => "mesh-proxy + access log",
        }
    }

    pub fn uses_ebpf(self) -> bool {
        matches!(self, PathKind::Ebpf)
    }

    /// Whether the path writes an access line per request.
    pub fn logs(self) -> bool {
        matches!(self, PathKind::HaproxyLog | PathKind::NginxLog | PathKind::MeshProxyLog)
    }

    /// Whether the path runs `workload`. nginx and Caddy cannot connect to a redirected
    /// connection's original destination, so they have no TCP passthrough; the logging variants
    /// differ from their plain path only per request, so their passthrough and idle memory would
    /// repeat the plain path's figures.
    pub fn runs(self, workload: crate::bench::Workload) -> bool {
        use crate::bench::Workload;
        match workload {
            Workload::Passthrough => {
                matches!(self, PathKind::Direct | PathKind::Haproxy | PathKind::MeshProxy | PathKind::Ebpf)
            }
            Workload::Idle => !self.logs(),
            // The backend (nginx) speaks HTTP/1.1 only: the direct path has no HTTP/2; nginx
            // 1.22 cannot serve HTTP/1.1 and h2c on one port, Caddy serves h2c only when told.
            Workload::H2 => matches!(self, PathKind::Haproxy | PathKind::MeshProxy | PathKind::Nghttpx),
            _ => true,
        }
    }
}

impl fmt::Display for PathKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The workspace binaries a run uses.
#[derive(Debug, Clone)]
pub struct Bins {
    pub mesh_init: PathBuf,
    pub mesh_proxy: PathBuf,
}

/// How HAProxy is configured: it terminates HTTP for the HTTP workloads, and relays bytes for the
/// TCP passthrough workload (one frontend cannot do both on one port without content switching
/// that the other proxies do not need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarMode {
    Http,
    Tcp,
}

/// A running sidecar and what it takes to restart it.
pub struct Sidecar {
    pub proc: Proc,
    mode: SidecarMode,
}

/// `mesh-init ebpf` attached to the pod's cgroup; detached and unpinned on drop (before the
/// cgroup is removed: this field order is kept in [`BenchPath`]).
struct EbpfAttachment {
    mesh_init: PathBuf,
    cgroup: PathBuf,
    netns: String,
}

impl Drop for EbpfAttachment {
    fn drop(&mut self) {
        let _ = Command::new(&self.mesh_init)
            .args(["ebpf", "--cleanup-only", "--netns", &self.netns, "--cgroup"])
            .arg(&self.cgroup)
            .output();
    }
}

/// One path, set up and ready for load.
pub struct BenchPath {
    pub kind: PathKind,
    pub sidecar: Option<Sidecar>,
    ebpf: Option<EbpfAttachment>,
    pub pod: Pod,
    dir: TempDir,
    bins: Bins,
    /// HAProxy's maxconn: enough for the idle workload, small enough for the descriptor limit.
    max_conns: u32,
}

impl BenchPath {
    pub fn setup(kind: PathKind, backend: &mut Backend, bins: &Bins, max_conns: u32) -> Result<BenchPath> {
        let tag = match kind {
            PathKind::Direct => "direct",
            PathKind::Haproxy => "haproxy",
            PathKind::Nginx => "nginx",
            PathKind::Caddy => "caddy",
            PathKind::Nghttpx => "nghttpx",
            PathKind::MeshProxy => "meshproxy",
            PathKind::Ebpf => "ebpf",
            PathKind::HaproxyLog => "haproxylog",
            PathKind::NginxLog => "nginxlog",
            PathKind::MeshProxyLog => "meshproxylog",
        };
        let pod = backend.pod(tag, kind.uses_ebpf());
        let dir = TempDir::new("bench-tmp");
        let mut path = BenchPath { kind, sidecar: None, ebpf: None, pod, dir, bins: bins.clone(), max_conns };
        match kind {
            PathKind::Direct => {}
            PathKind::Ebpf => {
                let cgroup = path.pod.cgroup.as_ref().expect("eBPF pods have a cgroup").path().to_path_buf();
                path.ebpf = Some(EbpfAttachment {
                    mesh_init: bins.mesh_init.clone(),
                    cgroup: cgroup.clone(),
                    netns: path.pod.ns.name().to_string(),
                });
                let mut cmd = Command::new(&bins.mesh_init);
                cmd.args(["ebpf", "--netns", path.pod.ns.name()])
                    .args([format!("--{}", flags::ENVOY_PORT.long), PROXY_PORT.to_string()])
                    .arg("--cgroup")
                    .arg(&cgroup);
                run(&mut cmd, Duration::from_secs(30))?;
            }
            _ => {
                run(
                    Command::new(&bins.mesh_init).args([
                        "iptables",
                        "--netns",
                        path.pod.ns.name(),
                        &format!("--{}", flags::ENVOY_PORT.long),
                        &PROXY_PORT.to_string(),
                        "-z",
                        &PROXY_PORT.to_string(),
                        "-i",
                        "*",
                        "-b",
                        "*",
                    ]),
                    Duration::from_secs(20),
                )?;
            }
        }
        if kind != PathKind::Direct {
            path.start_sidecar(SidecarMode::Http)?;
        }
        // The interception must be real: a sidecar path the client bypasses would measure direct.
        let intercepted = path.pod.intercepted()?;
        ensure!(
            intercepted == (kind != PathKind::Direct),
            "{kind}: a probe connection was {} intercepted",
            if intercepted { "unexpectedly" } else { "not" }
        );
        Ok(path)
    }

    /// Starts the sidecar (stopping a running one first) in the given mode and waits until it listens.
    pub fn start_sidecar(&mut self, mode: SidecarMode) -> Result<()> {
        self.sidecar = None;
        let log = self.dir.path().join(format!("sidecar-{}.log", self.dir_seq()));
        let mut proc = match self.kind {
            PathKind::Direct => bail!("the direct path has no sidecar"),
            PathKind::Haproxy | PathKind::HaproxyLog => {
                let conf = self.dir.write(
                    "haproxy.cfg",
                    &haproxy_conf(mode, &self.pod.backend.to_string(), self.max_conns + 40, self.kind.logs()),
                );
                // -db: foreground, no daemon; -f: our file only.
                Proc::spawn_logged(
                    "haproxy",
                    self.pod.command_as(PROXY_UID, PROXY_GID, "haproxy").args(["-db", "-f"]).arg(&conf),
                    &log,
                )
            }
            PathKind::Nginx | PathKind::NginxLog => {
                // nginx as UID 1337 writes its pid, temp and log files in a directory of its own.
                let run_dir = self.dir.path().join(format!("nginx-{}", self.dir_seq()));
                std::fs::create_dir(&run_dir)?;
                std::os::unix::fs::chown(&run_dir, Some(PROXY_UID), Some(PROXY_GID))?;
                let conf = self.dir.write(
                    "nginx-sidecar.conf",
                    &nginx_conf(&run_dir, &self.pod.backend.to_string(), self.max_conns + 40, self.kind.logs()),
                );
                Proc::spawn_logged(
                    "nginx",
                    self.pod.command_as(PROXY_UID, PROXY_GID, "nginx").args(["-e", "stderr", "-c"]).arg(&conf),
                    &log,
                )
            }
            PathKind::Caddy => {
                // Caddy wants a writable home for its state even with automatic HTTPS off.
                let home = self.dir.path().join(format!("caddy-{}", self.dir_seq()));
                std::fs::create_dir(&home)?;
                std::os::unix::fs::chown(&home, Some(PROXY_UID), Some(PROXY_GID))?;
                let conf = self.dir.write("Caddyfile", &caddy_conf(&self.pod.backend.to_string()));
                Proc::spawn_logged(
                    "caddy",
                    self.pod
                        .command_as(PROXY_UID, PROXY_GID, "caddy")
                        .args(["run", "--adapter", "caddyfile", "--config"])
                        .arg(&conf)
                        // One thread running Go code, as the other sidecars' one worker.
                        .env("GOMAXPROCS", "1")
                        .env("HOME", &home)
                        .env("XDG_DATA_HOME", &home)
                        .env("XDG_CONFIG_HOME", &home),
                    &log,
                )
            }
            PathKind::Nghttpx => Proc::spawn_logged(
                "nghttpx",
                self.pod
                    .command_as(PROXY_UID, PROXY_GID, "nghttpx")
                    // Clear text on the redirect port (HTTP/1.1 and prior-knowledge h2c), one
                    // worker thread, HTTP/1.1 keep-alive to nginx, no access log (its default).
                    .args(["--conf=/dev/null", "--workers=1", "--single-thread", "--no-ocsp"])
                    .arg(format!("--frontend=*,{PROXY_PORT};no-tls"))
                    .arg(format!("--backend={},80", self.pod.backend))
                    .arg("--errorlog-file=/dev/stderr"),
                &log,
            ),
            _ => {
                let conf = self.dir.write("mesh-proxy.yaml", &mesh_proxy_conf(&self.pod.backend.to_string()));
                // One data-plane thread, as HAProxy's nbthread 1. The access log is on by default
                // (`info`); `warn` turns it off, as HAProxy's and nginx's plain paths have none.
                let level = if self.kind.logs() { "info" } else { "warn" };
                Proc::spawn_logged(
                    "mesh-proxy",
                    self.pod.command_as(PROXY_UID, PROXY_GID, &self.bins.mesh_proxy).arg("--config").arg(&conf).args([
                        "--workers",
                        "1",
                        "--log-level",
                        level,
                    ]),
                    &log,
                )
            }
        };
        wait_listening(&self.pod.ns, format!("127.0.0.1:{PROXY_PORT}").parse()?, Duration::from_secs(15), &mut proc)?;
        self.sidecar = Some(Sidecar { proc, mode });
        Ok(())
    }

    /// Makes sure the sidecar runs in `mode` (HAProxy is restarted to switch; mesh-proxy serves
    /// both from one configuration).
    pub fn ensure_mode(&mut self, mode: SidecarMode) -> Result<()> {
        match &mut self.sidecar {
            None => Ok(()),
            Some(s) if !matches!(self.kind, PathKind::Haproxy | PathKind::HaproxyLog) || s.mode == mode => {
                s.proc.ensure_running()
            }
            Some(_) => self.start_sidecar(mode),
        }
    }

    /// A restart, so that memory figures start from a fresh process.
    pub fn restart_sidecar(&mut self) -> Result<()> {
        if self.sidecar.is_some() {
            self.start_sidecar(SidecarMode::Http)?;
        }
        Ok(())
    }

    fn dir_seq(&self) -> usize {
        std::fs::read_dir(self.dir.path()).map(|d| d.count()).unwrap_or(0)
    }
}

/// HAProxy with one thread. HTTP mode: a static backend (nginx), the counterpart of mesh-proxy's
/// route to the same nginx. TCP mode: `server 0.0.0.0:0`, which HAProxy documents as "connect
/// to the address the client connected to"; on a REDIRECTed socket HAProxy reads that address
/// with SO_ORIGINAL_DST (when built with Linux TPROXY support, as Debian's is), so this is a
/// real passthrough to the original destination, checked by the iperf3 run itself.
///
/// With `log`, one line per request (`option httplog`) written to stderr, which is a file here:
/// HAProxy's own way of logging without a syslog daemon.
fn haproxy_conf(mode: SidecarMode, backend: &str, maxconn: u32, log: bool) -> String {
    let (mode_line, server) = match mode {
        SidecarMode::Http => ("http", format!("{backend}:80")),
        SidecarMode::Tcp => ("tcp", "0.0.0.0:0".to_string()),
    };
    let (global_log, defaults_log) =
        if log { ("  log stderr format raw local0 info\n", "  log global\n  option httplog\n") } else { ("", "") };
    format!(
        "global\n  nbthread 1\n  maxconn {maxconn}\n{global_log}\
         defaults\n  mode {mode_line}\n{defaults_log}  timeout connect 5s\n  timeout client 300s\n  timeout server 300s\n  timeout http-keep-alive 300s\n\
         frontend sidecar\n  bind 0.0.0.0:{PROXY_PORT}\n  default_backend upstream\n\
         backend upstream\n  server s1 {server}\n"
    )
}

/// nginx as a sidecar: one worker, no master (so the measured process is the one serving),
/// `proxy_pass` to a static upstream with keep-alive connections (nginx's default would open one
/// per request), keep-alive limits as the backend's. With `log`, nginx's default access log
/// (one unbuffered write per request) into a file.
fn nginx_conf(dir: &Path, backend: &str, conns: u32, log: bool) -> String {
    let d = dir.display();
    let access = if log { format!("access_log {d}/access.log;") } else { "access_log off;".to_string() };
    format!(
        "worker_processes 1;\nmaster_process off;\ndaemon off;\nworker_rlimit_nofile 200000;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections {conns}; }}\n\
         http {{\n  {access}\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n\
           client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
           upstream backend {{ server {backend}:80; keepalive 64; keepalive_requests 10000000; keepalive_timeout 300s; }}\n\
           server {{\n    listen {PROXY_PORT} backlog=8192;\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n"
    )
}

/// Caddy as a sidecar: plain HTTP on the redirect port, `reverse_proxy` to nginx (keep-alive
/// upstream connections are its default), no admin endpoint, no access log (Caddy's default).
fn caddy_conf(backend: &str) -> String {
    format!(
        "{{\n  admin off\n  auto_https off\n}}\n\
         http://:{PROXY_PORT} {{\n  reverse_proxy {backend}:80\n}}\n"
    )
}

/// mesh-proxy: an HTTP route for nginx; anything else (iperf3's port) is unknown and passes
/// through to its original destination (`outbound_policy: allow_any`).
fn mesh_proxy_conf(backend: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:{admin} }}\noutbound_policy: allow_any\n\
         listeners:\n  - name: virtual\n    address: 0.0.0.0:{PROXY_PORT}\n\
         routes:\n  - name: nginx\n    destinations: [\"{backend}:80\"]\n    protocol: http\n    rules:\n      - clusters: [{{ name: nginx, weight: 1 }}]\n\
         clusters:\n  - name: nginx\n    lb_policy: round_robin\n    connect_timeout: 1s\n\
         endpoints:\n  - cluster: nginx\n    addresses: [\"{backend}:80\"]\n",
        admin = ports::ADMIN
    )
}

/// Why a path cannot be measured on this machine, or None when it can.
pub fn unavailable(kind: PathKind, bins: &Bins) -> Option<String> {
    match kind {
        PathKind::Direct | PathKind::MeshProxy | PathKind::MeshProxyLog => None,
        PathKind::Haproxy | PathKind::HaproxyLog => which("haproxy").err().map(|e| e.to_string()),
        PathKind::Nginx | PathKind::NginxLog => which("nginx").err().map(|e| e.to_string()),
        PathKind::Caddy => which("caddy").err().map(|e| e.to_string()),
        PathKind::Nghttpx => which("nghttpx").err().map(|e| e.to_string()),
        PathKind::Ebpf => {
            let out = Command::new(&bins.mesh_init).args(["ebpf", "--help"]).output();
            match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => Some(format!(
                    "`mesh-init ebpf` is not available in this build: {}",
                    String::from_utf8_lossy(&o.stderr).lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim()
                )),
                Err(e) => Some(format!("cannot run {}: {e}", bins.mesh_init.display())),
            }
        }
    }
}

pub fn which(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} is not installed (scripts/setup.sh installs it)"))
}

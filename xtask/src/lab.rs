//! The benchmark's private network and the things that live in it, each a guard that removes
//! itself on drop (which also runs when the harness fails or is interrupted, see
//! [`crate::interrupt`]).
//!
//! Layout: one *backend* namespace runs nginx and an iperf3 server; every path under test gets
//! its own *pod* namespace joined to the backend by a veth pair created inside the pod namespace
//! (`10.200.K.1` pod side, `10.200.K.2` backend side). Nothing is connected to the machine's own
//! namespace. Every object is named `mesh-bench-<tag>-<pid>-<n>`, so `scripts/lib.sh`'s reaper
//! recognises leftovers of a run that was killed outright.

use std::{
    ffi::OsStr,
    fs,
    io::{Read, Seek},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};

use crate::interrupt;

/// A fresh `mesh-bench-<tag>-<pid>-<n>` name.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("mesh-bench-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Runs a command to completion within `limit`; fails with its output when it fails.
pub fn run(cmd: &mut Command, limit: Duration) -> Result<String> {
    let out = Bounded::spawn(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()))?.wait(limit)?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}{}", out.status, out.stdout.trim(), out.stderr.trim());
    }
    Ok(out.stdout)
}

/// What a bounded child printed.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A child that is waited for at most a given time, and killed early on Ctrl-C.
pub struct Bounded {
    child: Child,
    what: String,
}

impl Bounded {
    pub fn spawn(cmd: &mut Command) -> Result<Bounded> {
        let what = format!("{cmd:?}");
        let child = cmd.stdin(Stdio::null()).spawn().with_context(|| format!("cannot start {what}"))?;
        Ok(Bounded { child, what })
    }

    /// Waits for the exit, reading stdout and stderr (on threads, so a full pipe never blocks it).
    pub fn wait(mut self, limit: Duration) -> Result<Output> {
        let mut out = self.child.stdout.take();
        let mut err = self.child.stderr.take();
        let t_out = std::thread::spawn(move || read_all(out.as_mut()));
        let t_err = std::thread::spawn(move || read_all(err.as_mut()));
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if interrupt::requested() {
                bail!("interrupted while running {}", self.what);
            }
            if Instant::now() > deadline {
                bail!("{} did not finish within {limit:?}", self.what);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() })
    }
}

fn read_all(r: Option<&mut impl Read>) -> String {
    let mut s = String::new();
    if let Some(r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

impl Drop for Bounded {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A network namespace, deleted (with every process still in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]), Duration::from_secs(10))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `program` inside the namespace. nsenter (unlike `ip netns exec`) keeps the caller's
    /// mounts, so cgroup2 and bpffs stay visible, and it execs: the child's PID is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Like [`Netns::command`], as another user and group (the sidecars run as 1337).
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .args(["-S", &uid.to_string(), "-G", &uid.to_string(), "--"])
            .arg(program);
        c
    }

    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args), Duration::from_secs(10)).map(drop)
    }

    /// Sets a per-namespace sysctl (`net.*`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]), Duration::from_secs(10)).map(drop)
    }

    /// Runs `f` on a thread that joined this namespace (for in-process probes).
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                let file = fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
        })
    }

    /// Waits until something accepts TCP connections on `addr` inside the namespace.
    pub fn wait_listening(&self, addr: SocketAddr, limit: Duration, proc: &mut Proc) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.within(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())? {
                return Ok(());
            }
            proc.ensure_running()?;
            interrupt::check()?;
            ensure!(Instant::now() < deadline, "{} does not listen on {addr} after {limit:?}", proc.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A long-running child (nginx, a proxy, a server), its output in a log file; killed on drop.
pub struct Proc {
    child: Child,
    pub name: String,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Result<Proc> {
        let file = fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Proc { child, name: name.to_string(), log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, quoting the end of its log, when the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let mut text = String::new();
            if let Ok(mut f) = fs::File::open(&self.log) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(2000)));
                let _ = f.read_to_string(&mut text);
            }
            bail!("{} exited ({status}); its log {} ends with:\n{}", self.name, self.log.display(), text.trim());
        }
        Ok(())
    }

    /// CPU time (user + system, all threads) the process has used so far.
    pub fn cpu(&self) -> Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the `(comm)`, which may itself contain spaces: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
    }

    /// (VmRSS, VmHWM) in KiB: resident now, and the peak over the process's life.
    pub fn memory(&self) -> Result<(u64, u64)> {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Result<u64> {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .with_context(|| format!("no {name} in /proc/PID/status"))?;
            Ok(line.split_whitespace().nth(1).context("malformed status")?.parse()?)
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory (configs, logs, pid files), readable by the proxies' user; removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> Result<TempDir> {
        let path = std::env::temp_dir().join(unique("tmp"));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        Ok(TempDir { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes a world-readable file in the directory and returns its path.
    pub fn write(&self, name: &str, text: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644))?;
        Ok(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Where cgroup2 is mounted (hybrid hosts: /sys/fs/cgroup/unified; pure v2: /sys/fs/cgroup).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount))
        })
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// A cgroup v2 directory of our own (the eBPF paths' "pod"), never the root; on drop its
/// processes are killed and the directory removed.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    pub fn new(tag: &str) -> Result<Cgroup> {
        let path = cgroup2_mount()?.join(unique(tag));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process join this cgroup before it executes.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: between fork and exec only open/write/close happen.
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, b"0"));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids: Vec<i32> = fs::read_to_string(self.path.join("cgroup.procs"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = fs::remove_dir(&self.path);
    }
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

    /// Like [`Pod::command`], as the proxy's user.
    pub fn command_as(&self, uid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = self.ns.command_as(uid, program);
        if let Some(cg) = &self.cgroup {
            cg.enter(&mut c);
        }
        c
    }

    /// True when a connection from the pod to a port nothing listens on succeeds: something
    /// (a sidecar behind the interception) accepted it. A direct path gets "connection refused".
    pub fn intercepted(&self) -> Result<bool> {
        let probe = format!("exec 3<>/dev/tcp/{}/9", self.backend);
        let out =
            Bounded::spawn(self.command("bash").args(["-c", &probe]).stdout(Stdio::piped()).stderr(Stdio::piped()))?
                .wait(Duration::from_secs(5))?;
        Ok(out.status.success())
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
        let dir = TempDir::new()?;
        let ns = Netns::new("backend")?;
        let conf = dir.write("nginx.conf", &nginx_conf(dir.path()))?;
        let mut nginx = Proc::spawn(
            "nginx",
            ns.command("nginx").arg("-c").arg(&conf).args(["-g", "daemon off;"]),
            dir.path().join("nginx.log"),
        )?;
        let mut iperf = Proc::spawn(
            "iperf3 server",
            ns.command("iperf3").args(["-s", "-p", "5201"]),
            dir.path().join("iperf3.log"),
        )?;
        ns.wait_listening("127.0.0.1:80".parse()?, Duration::from_secs(10), &mut nginx)?;
        ns.wait_listening("127.0.0.1:5201".parse()?, Duration::from_secs(10), &mut iperf)?;
        Ok(Backend { _nginx: nginx, _iperf: iperf, ns, _dir: dir, next_subnet: 1 })
    }

    /// A new pod namespace with a veth pair to the backend (created inside the namespaces).
    pub fn pod(&mut self, tag: &str, cgroup: bool) -> Result<Pod> {
        let k = self.next_subnet;
        self.next_subnet += 1;
        let ns = Netns::new(tag)?;
        let peer = format!("v{k}");
        ns.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", self.ns.name()])?;
        ns.ip(&["addr", "add", &format!("10.200.{k}.1/24"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        self.ns.ip(&["addr", "add", &format!("10.200.{k}.2/24"), "dev", &peer])?;
        self.ns.ip(&["link", "set", &peer, "up"])?;
        // Connection-per-request workloads open tens of thousands of connections a run.
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        let cgroup = if cgroup { Some(Cgroup::new(tag)?) } else { None };
        Ok(Pod { cgroup, ns, backend: Ipv4Addr::new(10, 200, k, 2) })
    }
}

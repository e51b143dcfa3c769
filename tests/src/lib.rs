//! Fixtures for end-to-end tests in real network namespaces.
//!
//! Every test builds its own little network: a "pod" namespace and a "remote" namespace joined
//! by a veth pair created *inside* the pod namespace, so nothing is ever connected to, or
//! configured in, the machine's own namespace. Addresses come from 10.200.0.0/16 and
//! fd00:200::/32 only. Guards remove namespaces, cgroups and processes in `Drop`, which also
//! runs when a test panics.
//!
//! Privileged tests call [`privileged`] first: without root they are skipped, except when `CI`
//! is set, where they fail — a CI run that silently skipped them would prove nothing.

use std::{
    ffi::OsStr,
    fs,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// The pod's address on its veth.
pub const POD_V4: &str = "10.200.0.1";
pub const POD_V6: &str = "fd00:200::1";
/// The remote's address on its veth; the pod's default route points here.
pub const REMOTE_V4: &str = "10.200.0.2";
pub const REMOTE_V6: &str = "fd00:200::2";

/// Returns true when the test may use namespaces (root). Without root: false (skip), unless
/// `CI` is set, in which case it panics so the run fails.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root for network namespaces, and CI is set: failing instead of skipping");
    }
    eprintln!("skipped {test}: needs root (network namespaces)");
    false
}

/// Path of a workspace binary (`mesh-init`, `mesh-proxy`), built by `cargo build --workspace`
/// into the same target directory as the running test.
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("MESH_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    // target/<profile>/deps/<test-binary> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(path.is_file(), "{} is missing: build it first (`cargo build --workspace --bins`)", path.display());
    path
}

/// A script shipped with these tests (`tests/py/...`).
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("mesh-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Starts `py/origdst_server.py` on `ports` through `cmd` (a `python3` command already placed in
/// the right namespace, user and cgroup) and returns once every socket listens.
pub fn origdst_server(mut cmd: Command, ports: &[u16]) -> Proc {
    cmd.arg(script("origdst_server.py")).args(ports.iter().map(u16::to_string));
    let mut p = Proc::spawn(&mut cmd);
    p.wait_for_line("ready");
    p
}

/// `cgroup`'s block of `mesh-init status` (a header line naming the cgroup, then indented
/// lines), seen from `netns`; lines starting with one of `skip` are left out.
pub fn ebpf_status_of(netns: &Netns, cgroup: &Cgroup, skip: &[&str]) -> String {
    let out = check(Command::new(bin("mesh-init")).args(["status", "--netns", netns.name()]));
    let ours = format!("cgroup {} ", cgroup.path().display());
    let mut in_block = false;
    let mut block = String::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.starts_with(' ') {
            in_block = line.contains(&ours);
        }
        if in_block && !skip.iter().any(|p| line.trim_start().starts_with(p)) {
            block += line;
            block.push('\n');
        }
    }
    block
}

/// Runs a command to completion; panics with its output when it fails.
pub fn check(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace, deleted (with every process still in it) on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `mesh-<tag>-<pid>-<n>` with loopback up.
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace (through nsenter, which keeps the caller's mounts, so
    /// cgroup2 and bpffs stay visible).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Like [`Netns::command`], as another user and group (the proxy runs as 1337).
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .args(["-S", &uid.to_string(), "-G", &gid.to_string(), "--"])
            .arg(program);
        c
    }

    /// `ip ARGS` inside the namespace; panics on failure.
    pub fn ip(&self, args: &[&str]) -> Output {
        check(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A shell snippet inside the namespace; panics on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = check(self.command("sh").args(["-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread that has joined this namespace, for in-process sockets.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).expect("open netns");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }

    /// Spawns a long-running process; it is killed when the guard drops.
    pub fn spawn(&self, mut cmd: Command) -> Proc {
        Proc::spawn(&mut cmd)
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

/// A child process killed (and reaped) on drop.
pub struct Proc {
    child: Child,
    pub stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        let stdout = child.stdout.take().map(BufReader::new);
        Proc { child, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process prints a line containing `marker` (e.g. "ready").
    pub fn wait_for_line(&mut self, marker: &str) -> String {
        let out = self.stdout.as_mut().expect("stdout is piped");
        let mut line = String::new();
        loop {
            line.clear();
            let n = out.read_line(&mut line).expect("read child stdout");
            assert!(n > 0, "process exited before printing {marker:?}");
            if line.contains(marker) {
                return line;
            }
        }
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends a signal and waits up to `timeout` for the exit status.
    pub fn signal_and_wait(
        &mut self,
        sig: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A pod and a remote host joined by a veth pair (`eth0` on both sides), IPv4 and IPv6. The
/// pod's default routes point at the remote, which is a dead end: nothing leaves the pair.
pub struct PodNet {
    pub pod: Netns,
    pub remote: Netns,
}

impl PodNet {
    pub fn new(tag: &str) -> PodNet {
        let pod = Netns::new(&format!("{tag}-p"));
        let remote = Netns::new(&format!("{tag}-r"));
        pod.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", remote.name()]);
        for (ns, v4, v6) in [(&pod, POD_V4, POD_V6), (&remote, REMOTE_V4, REMOTE_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        pod.ip(&["route", "add", "default", "via", REMOTE_V4]);
        pod.ip(&["-6", "route", "add", "default", "via", REMOTE_V6]);
        PodNet { pod, remote }
    }

    /// Gives the remote another address (e.g. a service's) reachable from the pod.
    pub fn add_remote_addr(&self, cidr: &str) {
        let v6 = cidr.contains(':');
        let mut args = vec![];
        if v6 {
            args.push("-6");
        }
        args.extend(["addr", "add", cidr, "dev", "eth0"]);
        if v6 {
            args.push("nodad");
        }
        self.remote.ip(&args);
    }
}

/// A cgroup v2 directory created for one test under the cgroup2 mount, never the root itself.
/// On drop its processes are killed and the directory removed.
pub struct Cgroup {
    path: PathBuf,
}

/// Where cgroup2 is mounted, read from /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount))
        })
        .expect("no cgroup2 mount")
}

impl Cgroup {
    pub fn new(tag: &str) -> Cgroup {
        let path = cgroup2_mount().join(unique(&format!("test-{tag}")));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process join this cgroup before it executes.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // SAFETY: only async-signal-safe work between fork and exec: open/write/close.
        unsafe {
            cmd.pre_exec(move || fs::write(&procs, b"0"));
        }
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let pids = self.pids();
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

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

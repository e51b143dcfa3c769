//! Network namespaces: the "pods" and "hosts" of every test and of the bench, joined by veth
//! pairs created inside them, so nothing is ever connected to or configured in the machine's own
//! namespace.

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use nix::{
    sched::{setns, CloneFlags},
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{check, unique};

/// A named network namespace (`ip netns`, so `ip -n` and `mesh-init --netns` can name it) with
/// loopback up. On drop every process still inside is killed and the namespace deleted, which
/// also deletes the veth ends in it.
pub struct Netns {
    /// `mesh-<tag>-<pid>-<n>`, as `ip netns list` shows it.
    name: String,
}

impl Netns {
    /// Creates `mesh-<tag>-<pid>-<n>` with `lo` up; panics when `ip netns add` fails.
    pub fn new(tag: &str) -> Netns {
        let name = unique(tag);
        check(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The name to pass to `ip -n`, `nsenter` or `mesh-init --netns`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount (`/run/netns/<name>`), for `setns` and `--net=`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `program` run inside the namespace. nsenter, unlike `ip netns exec`, keeps the caller's
    /// mounts (cgroup2 and bpffs stay visible) and execs, so the child's PID is the program's.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        c
    }

    /// Like [`Netns::command`], as another user and group: the proxy runs as 1337, whose traffic
    /// interception leaves alone.
    pub fn command_as(&self, uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .args(["-S", &uid.to_string(), "-G", &gid.to_string(), "--"])
            .arg(program);
        c
    }

    /// `ip ARGS` inside the namespace; panics on failure (setting up our own namespace).
    #[track_caller]
    pub fn ip(&self, args: &[&str]) -> Output {
        check(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A shell snippet inside the namespace, returning its stdout; panics on failure.
    #[track_caller]
    pub fn sh(&self, script: &str) -> String {
        let out = check(self.command("sh").args(["-c", script]));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets a per-namespace sysctl (`net.*`), never the machine's.
    pub fn sysctl(&self, key: &str, value: &str) {
        check(self.command("sysctl").args(["-q", "-w", &format!("{key}={value}")]));
    }

    /// A veth pair: `name` here, `peer_name` in `peer`, both up. It is created inside this
    /// namespace (never in the machine's) and goes away with either namespace.
    pub fn veth(&self, name: &str, peer: &Netns, peer_name: &str) {
        self.ip(&["link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer.name()]);
        self.ip(&["link", "set", name, "up"]);
        peer.ip(&["link", "set", peer_name, "up"]);
    }

    /// Runs `f` on a thread that has joined this namespace, for sockets opened in-process (a
    /// probe, an HTTP client); the caller's own thread never changes namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                setns(file, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

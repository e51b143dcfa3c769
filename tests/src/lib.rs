//! What the end-to-end suites share on top of mesh-lab (namespaces, cgroups, processes, waits):
//! the topology they run in and the helpers only they need.
//!
//! Every test builds its own little network, a [`PodNet`]: a "pod" namespace and a "remote"
//! namespace joined by a veth pair created *inside* the pod namespace, so nothing is ever
//! connected to, or configured in, the machine's own namespace. Addresses come from
//! 10.200.0.0/16 and fd00:200::/32 only. Besides: where the workspace binaries and the python
//! helpers are ([`bin`], [`script`]), the original-destination echo server ([`origdst_server`])
//! and a cgroup's block of `mesh-init status` ([`ebpf_status_of`]).
//!
//! Privileged tests call [`mesh_lab::privileged`] first: without root they are skipped, except
//! when `CI` is set, where they fail — a CI run that silently skipped them would prove nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mesh_lab::{check, Cgroup, Netns, Proc};

/// The pod's address on its veth.
pub const POD_V4: &str = "10.200.0.1";
pub const POD_V6: &str = "fd00:200::1";
/// The remote's address on its veth; the pod's default route points here.
pub const REMOTE_V4: &str = "10.200.0.2";
pub const REMOTE_V6: &str = "fd00:200::2";

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

/// Installs `mesh-init iptables` in `pod` as the proxy suites run it: one proxy port (15000) for
/// both directions, everything captured, the proxy's UID 1337 exempt, and the inbound ports
/// `exclude_inbound` (`-d`, e.g. the admin port) left to reach their listeners.
pub fn capture_everything(pod: &Netns, exclude_inbound: &str) {
    check(Command::new(bin("mesh-init")).args([
        "iptables",
        "--netns",
        pod.name(),
        "-p",
        "15000",
        "-z",
        "15000",
        "-i",
        "*",
        "-b",
        "*",
        "-u",
        "1337",
        "-d",
        exclude_inbound,
    ]));
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
        pod.veth("eth0", &remote, "eth0");
        for (ns, v4, v6) in [(&pod, POD_V4, POD_V6), (&remote, REMOTE_V4, REMOTE_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
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

//! What only the eBPF mode has to prove (the behaviour both modes share is in `interception.rs`):
//! it acts on the cgroup and nothing else, its cleanup leaves nothing in the kernel (as `bpftool`
//! sees it), its per-connection maps are emptied as connections close, and `--log` shows the
//! programs' records.
//!
//! Each test builds its own pod/remote namespaces and its own cgroup (guards remove them, also
//! on failure); programs are attached only to that cgroup and that pod namespace.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use mesh_e2e::{bin, ebpf_status_of, origdst_server, script, PodNet, REMOTE_V4};
use mesh_lab::{cgroup2_mount, check, privileged, wait_until, Cgroup, Proc};

const PROXY_UID: u32 = 1337;

/// Fields drop in this order: the nested cgroups before their parent.
struct Pod {
    /// A pod-like cgroup inside `cgroup`, named as a kubelet names it, when the test needs one:
    /// then everything attaches there and the pod's processes run there.
    leaf: Option<Cgroup>,
    cgroup: Cgroup,
    net: PodNet,
    procs: Vec<Proc>,
}

impl Pod {
    fn new(tag: &str) -> Pod {
        Pod { net: PodNet::new(tag), cgroup: Cgroup::new(tag), leaf: None, procs: Vec::new() }
    }

    /// A pod whose cgroup is `components` below the test's own cgroup.
    fn nested(tag: &str, components: &[&str]) -> Pod {
        let mut pod = Pod::new(tag);
        pod.leaf = Some(pod.cgroup.nested(components.join("/")));
        pod
    }

    /// The cgroup mesh-init attaches to.
    fn cgroup_path(&self) -> &Path {
        self.leaf.as_ref().map_or(self.cgroup.path(), Cgroup::path)
    }

    fn mesh_init(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("mesh-init"));
        cmd.arg("ebpf").arg("--cgroup").arg(self.cgroup_path()).args(["--netns", self.net.pod.name()]).args(args);
        cmd.output().expect("run mesh-init")
    }

    fn install(&self, args: &[&str]) {
        let out = self.mesh_init(args);
        assert!(out.status.success(), "mesh-init ebpf {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A command in the pod's namespace and cgroup.
    fn in_pod(&self, uid: u32, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = self.net.pod.command_as(uid, uid, program);
        match &self.leaf {
            Some(leaf) => leaf.enter(&mut cmd),
            None => self.cgroup.enter(&mut cmd),
        }
        cmd
    }

    fn serve(&mut self, cmd: Command, ports: &[u16]) {
        self.procs.push(origdst_server(cmd, ports));
    }

    /// The stand-in proxy (UID 1337, in the cgroup). Started after `install`, as in a pod: the
    /// inbound listener is recorded when it starts listening.
    fn proxy(&mut self) {
        let cmd = self.in_pod(PROXY_UID, "python3");
        self.serve(cmd, &[15000]);
    }

    fn remote(&mut self, port: u16) {
        let cmd = self.net.remote.command("python3");
        self.serve(cmd, &[port]);
    }

    /// The port that answered a connection made by `cmd` (python3) to `addr`.
    fn answered_by(mut cmd: Command, addr: &str) -> u16 {
        let out = check(cmd.arg(script("probe.py")).args([addr, "2"]));
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        line.split_whitespace()
            .find_map(|f| f.strip_prefix("port="))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port= in {line:?}"))
    }

    /// The pin directory: the cgroup's path below the cgroup2 mount, escaped.
    fn pin_dir(&self) -> PathBuf {
        let relative = self.cgroup_path().strip_prefix(cgroup2_mount()).expect("below the cgroup2 mount");
        let name: String = relative
            .to_string_lossy()
            .chars()
            .map(|c| match c {
                '/' => "%2F".to_string(),
                '.' => "%2E".to_string(),
                '%' => "%25".to_string(),
                c => c.to_string(),
            })
            .collect();
        PathBuf::from("/sys/fs/bpf/mesh-init").join(name)
    }

    /// This cgroup's block of `mesh-init status`.
    fn status(&self) -> String {
        ebpf_status_of(&self.net.pod, self.leaf.as_ref().unwrap_or(&self.cgroup), &[])
    }

    /// Entry count of `map` in the status's "map entries" line.
    fn entries(&self, map: &str) -> u64 {
        let status = self.status();
        let line =
            status.lines().find(|l| l.contains("map entries:")).unwrap_or_else(|| panic!("no map entries in {status}"));
        line.split(", ")
            .find_map(|f| f.trim().trim_start_matches("map entries: ").strip_prefix(&format!("{map} ")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count for {map} in {line:?}"))
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.procs.clear();
        let _ = self.mesh_init(&["--cleanup-only"]);
    }
}

fn bpftool(args: &[&str]) -> String {
    let out = Command::new("bpftool").args(args).output().expect("bpftool is installed (scripts/setup.sh)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_process_outside_the_cgroup_is_not_redirected() {
    if !privileged("a_process_outside_the_cgroup_is_not_redirected") {
        return;
    }
    let mut pod = Pod::new("eout");
    pod.install(&[]);
    pod.proxy();
    pod.remote(80);
    let to = format!("{REMOTE_V4}:80");
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &to), 15000, "inside the cgroup: redirected");
    assert_eq!(Pod::answered_by(pod.net.pod.command("python3"), &to), 80, "same namespace, outside the cgroup: direct");
}

#[test]
fn cleanup_leaves_nothing_attached_pinned_or_loaded() {
    if !privileged("cleanup_leaves_nothing_attached_pinned_or_loaded") {
        return;
    }
    let mut pod = Pod::new("eclean");
    let cg = pod.cgroup.path().to_str().expect("utf-8 path").to_owned();
    pod.install(&["--accelerate"]);
    pod.proxy();
    pod.remote(80);
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000);

    // What is there: five cgroup programs, an sk_lookup link on the pod's namespace, pins.
    let attached = bpftool(&["cgroup", "show", &cg]);
    let prog_ids: Vec<String> = attached
        .lines()
        .filter_map(|l| {
            l.split_whitespace().next().filter(|w| w.chars().all(|c| c.is_ascii_digit())).map(str::to_owned)
        })
        .collect();
    assert_eq!(prog_ids.len(), 5, "connect4/6, sock_release, sock_ops, getsockopt:\n{attached}");
    let netns_ino =
        std::fs::metadata(pod.net.pod.path()).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect("netns inode");
    let ours = format!("netns_ino {netns_ino}");
    assert!(bpftool(&["link", "show"]).contains(&ours), "sk_lookup link on the pod namespace");
    assert!(pod.pin_dir().is_dir());

    pod.install(&["--cleanup-only"]);
    assert!(
        !bpftool(&["cgroup", "show", &cg]).lines().any(|l| l.trim().starts_with(char::is_numeric)),
        "no program on the cgroup"
    );
    assert!(!bpftool(&["link", "show"]).contains(&ours), "no link on the pod namespace");
    assert!(!pod.pin_dir().exists(), "pin directory removed");
    // Programs are freed once their last reference goes, after an RCU grace period.
    wait_until(Duration::from_secs(5), "the programs to be unloaded", || {
        let loaded = bpftool(&["prog", "show"]);
        prog_ids.iter().all(|id| !loaded.lines().any(|l| l.starts_with(&format!("{id}: ")))).then_some(())
    });
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 80, "nothing redirected");
}

#[test]
fn connection_maps_are_emptied_as_connections_close() {
    if !privileged("connection_maps_are_emptied_as_connections_close") {
        return;
    }
    // 100,000 by default, three times what ORIG_BY_PAIR holds (32,768): LRU keeps the maps
    // bounded whatever happens; this checks that entries are removed, not merely evicted. MESH_EBPF_CONNECTIONS makes it quicker for a local run.
    let n: u32 = std::env::var("MESH_EBPF_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let mut pod = Pod::new("emaps");
    pod.install(&[]);
    pod.proxy();
    let client = format!(
        "import socket, struct\n\
         for i in range({n}):\n\
         \x20   s = socket.create_connection(('{REMOTE_V4}', 80), timeout=5)\n\
         \x20   while not s.recv(4096).endswith(b'\\n'): pass\n\
         \x20   s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))\n\
         \x20   s.close()\n\
         print('done')\n"
    );
    let mut cmd = pod.in_pod(0, "python3");
    check(cmd.args(["-c", &client]));
    wait_until(Duration::from_secs(5), "the connection maps to empty", || {
        (pod.entries("ORIG_BY_COOKIE") == 0 && pod.entries("ORIG_BY_PAIR") == 0).then_some(())
    });
    let status = pod.status();
    let redirected = status
        .lines()
        .find_map(|l| {
            l.split(", ").find_map(|f| f.trim().trim_start_matches("counters: ").strip_prefix("outbound redirected "))
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no redirect counter in {status}"));
    assert_eq!(redirected, u64::from(n), "{status}");
}

#[test]
fn log_shows_the_programs_records_until_interrupted() {
    if !privileged("log_shows_the_programs_records_until_interrupted") {
        return;
    }
    let mut pod = Pod::new("elog");
    let mut cmd = Command::new(bin("mesh-init"));
    cmd.arg("ebpf").arg("--cgroup").arg(pod.cgroup.path()).args(["--netns", pod.net.pod.name(), "--log"]);
    let mut log = Proc::spawn(&mut cmd);
    log.wait_for_line("attached to cgroup");
    pod.proxy();
    pod.remote(80);
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000);
    let line = log.wait_for_line("connect uid=0");
    assert!(line.contains("10.200.0.2]:80"), "{line}");
    log.wait_for_line("SO_ORIGINAL_DST");
    let status =
        log.signal_and_wait(nix::sys::signal::Signal::SIGINT, Duration::from_secs(5)).expect("exits on Ctrl-C");
    assert!(status.success(), "{status}");
    let after = pod.status();
    assert!(!after.contains("log]") && !after.contains(", log"), "records switched off again:\n{after}");
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000, "still attached");
}

#[test]
fn accelerate_passes_loopback_data_through_the_sockhash() {
    if !privileged("accelerate_passes_loopback_data_through_the_sockhash") {
        return;
    }
    let mut pod = Pod::new("eaccel");
    pod.install(&["--accelerate"]);
    pod.proxy();
    pod.remote(80);
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000);
    // 8 MiB each way between two loopback sockets of the pod, byte for byte.
    let echo = "import socket, threading, hashlib, os\n\
                data = os.urandom(8 << 20)\n\
                l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)\n\
                def serve():\n\
                \x20   c, _ = l.accept(); got = b''\n\
                \x20   while len(got) < len(data): got += c.recv(1 << 16)\n\
                \x20   c.sendall(got); c.close()\n\
                t = threading.Thread(target=serve); t.start()\n\
                s = socket.create_connection(l.getsockname()); s.sendall(data); back = b''\n\
                while len(back) < len(data): back += s.recv(1 << 16)\n\
                t.join(); print('same' if back == data else 'different')\n";
    let mut cmd = pod.in_pod(0, "python3");
    let out = check(cmd.args(["-c", echo]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "same");
    let status = pod.status();
    let accelerated = status
        .lines()
        .find_map(|l| l.split(", ").find_map(|f| f.trim().strip_prefix("sockets accelerated ")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no accelerated counter in {status}"));
    assert!(accelerated >= 4, "both ends of both loopback connections: {status}");
    let redirected = status
        .lines()
        .find_map(|l| l.split(", ").find_map(|f| f.trim().strip_prefix("messages redirected ")))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no messages counter in {status}"));
    assert!(redirected > 0, "sends went through sk_msg: {status}");
    assert!(status.contains("accelerate"), "{status}");
}

#[test]
fn a_proxy_listening_before_the_programs_gets_inbound_connections() {
    if !privileged("a_proxy_listening_before_the_programs_gets_inbound_connections") {
        return;
    }
    let mut pod = Pod::new("eearly");
    pod.proxy();
    pod.install(&[]);
    let from_remote =
        |pod: &Pod| Pod::answered_by(pod.net.remote.command("python3"), &format!("{}:8080", mesh_e2e::POD_V4));
    assert_eq!(from_remote(&pod), 15000, "the listener was adopted at install");
    // And again after a cleanup and a fresh install, the proxy still running.
    pod.install(&["--cleanup-only"]);
    pod.install(&[]);
    assert_eq!(from_remote(&pod), 15000, "adopted again into the new map");
}
#[test]
fn pod_cgroups_of_both_kubelet_drivers_install_show_and_clean_up() {
    if !privileged("pod_cgroups_of_both_kubelet_drivers_install_show_and_clean_up") {
        return;
    }
    // The systemd driver's names have dots, which bpffs refuses in a pin directory's name.
    let uid = "0e6f3c2a-1b4d-4c5e-9f7a-2b8c4d6e8f01";
    let systemd = [
        "kubepods.slice".to_string(),
        "kubepods-burstable.slice".to_string(),
        format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
    ];
    let cgroupfs = ["kubepods".to_string(), "burstable".to_string(), format!("pod{uid}")];
    for (tag, components) in [("esysd", systemd), ("ecgfs", cgroupfs)] {
        let components: Vec<&str> = components.iter().map(String::as_str).collect();
        let mut pod = Pod::nested(tag, &components);
        pod.install(&[]);
        pod.proxy();
        pod.remote(80);
        assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000, "{tag}");
        let pins = pod.pin_dir();
        assert!(pins.is_dir(), "{tag}: {} is pinned", pins.display());
        let status = pod.status();
        assert!(
            status.contains("config:") && status.contains("connect4: attached"),
            "{tag}: shown unescaped:\n{status}"
        );
        // The reaper (scripts/lib.sh) maps the directory name back to the same cgroup.
        let name = pins.file_name().expect("pin dir name").to_string_lossy().into_owned();
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lib.sh");
        let out = check(Command::new("bash").arg("-c").arg(r#"source "$1"; mesh_pin_cgroup "$2""#).args([
            "-",
            lib.to_str().expect("utf-8"),
            &name,
        ]));
        let relative = pod.cgroup_path().strip_prefix(cgroup2_mount()).expect("below the mount");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), relative.to_string_lossy(), "{tag}");
        pod.install(&["--cleanup-only"]);
        assert!(!pins.exists(), "{tag}: pins removed");
        assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 80, "{tag}: detached");
    }
}

//! What only the eBPF mode has to prove (the behaviour both modes share is in `interception.rs`):
//! it acts on the cgroup and nothing else, its cleanup leaves nothing in the kernel (as `bpftool`
//! sees it), no destination is lost in a burst and its connection map empties, a change of
//! flags under traffic has no gap, a missing kernel feature is reported before anything is
//! created, pod cgroups of both kubelet drivers work, loopback data keeps TCP's backpressure,
//! and `--log` starts and stops the programs' records.
//!
//! Each test builds its own pod/remote namespaces and its own cgroup (guards remove them, also
//! on failure); programs are attached only to that cgroup and that pod namespace. The one test
//! that runs mesh-init in the machine's own namespace checks that it refuses there before
//! touching anything.

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

    /// Entry count of `map` in the status's "map entries: MAP n (bound m)" line.
    fn entries(&self, map: &str) -> u64 {
        let status = self.status();
        let line =
            status.lines().find(|l| l.contains("map entries:")).unwrap_or_else(|| panic!("no map entries in {status}"));
        line.trim()
            .trim_start_matches("map entries: ")
            .strip_prefix(&format!("{map} "))
            .and_then(|rest| rest.split_whitespace().next())
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
    pod.install(&[]);
    pod.proxy();
    pod.remote(80);
    assert_eq!(Pod::answered_by(pod.in_pod(0, "python3"), &format!("{REMOTE_V4}:80")), 15000);

    // What is there: seven cgroup programs, an sk_lookup link on the pod's namespace, pins.
    let attached = bpftool(&["cgroup", "show", &cg]);
    let prog_ids: Vec<String> = attached
        .lines()
        .filter_map(|l| {
            l.split_whitespace().next().filter(|w| w.chars().all(|c| c.is_ascii_digit())).map(str::to_owned)
        })
        .collect();
    assert_eq!(prog_ids.len(), 7, "connect4/6, getpeername4/6, sock_create, sock_ops, getsockopt:\n{attached}");
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
    // 100,000 by default, more than ORIG_BY_PAIR's bound (65,536): entries that were not
    // removed would fill it and be counted. MESH_EBPF_CONNECTIONS makes it quicker for a local
    // run.
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
        (pod.entries("ORIG_BY_PAIR") == 0).then_some(())
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

/// The `key=value` fields of a summary line printed by one of the `py/` tools.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .to_string()
}

fn field_u64(line: &str, key: &str) -> u64 {
    field(line, key).parse().unwrap_or_else(|e| panic!("{key}= in {line:?}: {e}"))
}

/// The one-line summary a `py/` tool prints, run to completion in the pod as root.
fn run_in_pod(pod: &Pod, script_name: &str, args: &[&str]) -> String {
    let mut cmd = pod.in_pod(0, "python3");
    cmd.arg(script(script_name)).args(args);
    let out = mesh_lab::run(&mut cmd, Duration::from_secs(180)).unwrap_or_else(|e| panic!("{script_name}: {e:#}"));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    eprintln!("{script_name} {args:?}: {text}");
    text
}

/// Which port answered a connection from `cmd` to `addr`, or the probe's error.
fn dial(mut cmd: Command, addr: &str) -> Result<u16, String> {
    let out = cmd.arg(script("probe.py")).args([addr, "2"]).output().expect("run probe.py");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.split_whitespace().find_map(|f| f.strip_prefix("port=")).and_then(|p| p.parse().ok()).ok_or(line)
}

#[test]
fn fail_open_hands_inbound_to_the_application_while_the_proxy_is_down() {
    if !privileged("fail_open_hands_inbound_to_the_application_while_the_proxy_is_down") {
        return;
    }
    let mut pod = Pod::new("efopen");
    pod.install(&["--inbound-fail-open"]);
    let app = pod.in_pod(0, "python3");
    pod.serve(app, &[8080]);
    let to_app = format!("{}:8080", mesh_e2e::POD_V4);
    assert_eq!(dial(pod.net.remote.command("python3"), &to_app), Ok(8080), "no proxy yet: the application answers");
    pod.proxy();
    assert_eq!(dial(pod.net.remote.command("python3"), &to_app), Ok(15000), "then the proxy takes inbound");
    let status = pod.status();
    assert!(status.contains("inbound fail-open"), "{status}");
}

#[test]
fn flags_swapped_under_load_neither_bypass_nor_refuse() {
    if !privileged("flags_swapped_under_load_neither_bypass_nor_refuse") {
        return;
    }
    let mut pod = Pod::new("eswap");
    pod.net.add_remote_addr("10.200.60.1/24");
    pod.net.pod.ip(&["route", "add", "10.200.60.0/24", "via", REMOTE_V4]);
    // Each pair captures the loops' connections both ways: a narrow selection and "all".
    let narrow = ["-i", "10.200.60.0/24", "-b", "20000-20999"];
    let all = ["-i", "*", "-b", "*"];
    pod.install(&narrow);
    pod.proxy();
    pod.remote(80);
    let app = pod.in_pod(0, "python3");
    pod.serve(app, &[20500]);
    let dir = mesh_lab::TempDir::new("eswap");
    let stop = dir.path().join("stop");
    let stop_arg = stop.to_str().expect("utf-8 path");
    let mut outbound = pod.in_pod(0, "python3");
    outbound.arg(script("connect_loop.py")).args(["10.200.60.1:80", stop_arg]);
    let mut outbound = Proc::spawn(&mut outbound);
    let mut inbound = pod.net.remote.command("python3");
    inbound.arg(script("connect_loop.py")).args([&format!("{}:20500", mesh_e2e::POD_V4), stop_arg]);
    let mut inbound = Proc::spawn(&mut inbound);
    outbound.wait_for_line("started");
    inbound.wait_for_line("started");
    for i in 0..30 {
        pod.install(if i % 2 == 0 { &all } else { &narrow });
    }
    std::fs::write(&stop, b"").expect("write the stop file");
    for (what, loop_) in [("outbound", &mut outbound), ("inbound", &mut inbound)] {
        let line = loop_.wait_for_line("connections=");
        eprintln!("{what}: {line}");
        assert_eq!(field(&line, "by_port"), format!("15000:{}", field(&line, "connections")), "{what}: {line}");
        assert_eq!(field_u64(&line, "errors"), 0, "{what}: {line}");
    }
}

#[test]
fn a_burst_of_40000_connects_to_a_paused_proxy_loses_no_destination() {
    if !privileged("a_burst_of_40000_connects_to_a_paused_proxy_loses_no_destination") {
        return;
    }
    let mut pod = Pod::new("eburst");
    // 20,000 connections per family to one proxy port need that many source ports, and an
    // accept queue that takes them all while the proxy is stopped: SYNs dropped by a full queue come back
    // only after seconds of backoff, minutes for thousands of them. Both settings only in the
    // pod's namespace.
    pod.net.pod.sysctl("net.ipv4.ip_local_port_range", "1024 65535");
    pod.net.pod.sysctl("net.core.somaxconn", "65535");
    pod.install(&[]);
    let mut proxy = pod.in_pod(PROXY_UID, "python3");
    proxy.env("BACKLOG", "65535");
    pod.serve(proxy, &[15000]);
    let proxy_pid = pod.procs.last().expect("the proxy").pid().to_string();
    let line = run_in_pod(&pod, "burst.py", &["40000", REMOTE_V4, mesh_e2e::REMOTE_V6, &proxy_pid]);
    assert_eq!(field_u64(&line, "answered"), 40_000, "{line}");
    assert_eq!((field_u64(&line, "missing"), field_u64(&line, "wrong")), (0, 0), "{line}");
    let status = pod.status();
    assert!(status.contains("pair map full 0"), "the bound was not hit:\n{status}");
    wait_until(Duration::from_secs(10), "the pair map to empty", || (pod.entries("ORIG_BY_PAIR") == 0).then_some(()));
}

#[test]
fn loopback_data_keeps_backpressure_and_arrives_whole() {
    if !privileged("loopback_data_keeps_backpressure_and_arrives_whole") {
        return;
    }
    let pod = Pod::new("ebulk");
    pod.install(&[]);
    const MIB: u64 = 1 << 20;
    let line = run_in_pod(&pod, "bulk.py", &["slow-reader", &(1536 * MIB).to_string()]);
    assert_eq!((field(&line, "same"), field_u64(&line, "received")), ("yes".to_string(), 1536 * MIB), "{line}");
    assert!(field_u64(&line, "peak_queued") <= field_u64(&line, "limit"), "bounded by the socket buffers: {line}");
    eprintln!(
        "machine-wide TCP memory: {} MiB before, {} MiB at the peak of the transfer (shared machine)",
        field_u64(&line, "tcp_mem_before") / MIB,
        field_u64(&line, "tcp_mem_peak") / MIB
    );
    let line = run_in_pod(&pod, "bulk.py", &["unread-writer"]);
    assert!(field_u64(&line, "queued") < 16 * MIB, "a writer nobody reads blocks within a few MiB: {line}");
    let line = run_in_pod(&pod, "bulk.py", &["shutdown-recv", "1000"]);
    assert_eq!((field_u64(&line, "eagain"), field_u64(&line, "wrong")), (0, 0), "{line}");
}

#[test]
fn a_missing_kernel_feature_is_one_sentence_and_leaves_nothing() {
    if !privileged("a_missing_kernel_feature_is_one_sentence_and_leaves_nothing") {
        return;
    }
    let pod = Pod::new("eprobe");
    let cg = pod.cgroup_path().to_str().expect("utf-8 path").to_owned();
    // As on a kernel without sk_lookup (before 5.9): that program type's loads are refused.
    let refuse = |args: &[&str]| {
        let mut cmd = Command::new(bin("mesh-init"));
        cmd.arg("ebpf").arg("--cgroup").arg(&cg).args(["--netns", pod.net.pod.name()]).args(args);
        cmd.env("MESH_INIT_EBPF_REFUSE_PROGRAM", "sk_lookup").output().expect("run mesh-init")
    };
    let out = refuse(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one sentence: {err}");
    assert!(err.contains("sk_lookup") && err.contains("Linux 5.9"), "names the feature and the kernel: {err}");
    assert!(!pod.pin_dir().exists(), "nothing pinned");
    assert!(!bpftool(&["cgroup", "show", &cg]).lines().any(|l| l.trim().starts_with(char::is_numeric)));
    // Without inbound capture sk_lookup is not needed, so not loaded, and the install works.
    let out = refuse(&["-b", ""]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = pod.status();
    assert!(status.contains("steer_inbound: not attached"), "{status}");
}

#[test]
fn log_stops_when_the_log_process_is_killed() {
    if !privileged("log_stops_when_the_log_process_is_killed") {
        return;
    }
    let pod = Pod::new("elogkill");
    let mut cmd = Command::new(bin("mesh-init"));
    cmd.arg("ebpf").arg("--cgroup").arg(pod.cgroup_path()).args(["--netns", pod.net.pod.name(), "--log"]);
    let mut log = Proc::spawn(&mut cmd);
    log.wait_for_line("attached to cgroup");
    assert!(pod.status().contains(", log"), "logging on while --log runs:\n{}", pod.status());
    log.signal_and_wait(nix::sys::signal::Signal::SIGKILL, Duration::from_secs(5)).expect("killed");
    wait_until(Duration::from_secs(10), "logging to switch itself off", || {
        (!pod.status().contains(", log")).then_some(())
    });
}

#[test]
fn a_closed_stdout_after_a_good_install_is_not_a_panic() {
    if !privileged("a_closed_stdout_after_a_good_install_is_not_a_panic") {
        return;
    }
    let pod = Pod::new("estdout");
    let mut cmd = Command::new(bin("mesh-init"));
    cmd.arg("ebpf").arg("--cgroup").arg(pod.cgroup_path()).args(["--netns", pod.net.pod.name()]);
    let mut child =
        cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().expect("spawn mesh-init");
    // The reading end goes away before mesh-init writes its first line.
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait for mesh-init");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{}: {err}", out.status);
    assert!(pod.status().contains("connect4: attached"), "installed");
}

#[test]
fn without_netns_nothing_touches_the_machines_loopback() {
    if !privileged("without_netns_nothing_touches_the_machines_loopback") {
        return;
    }
    // The test runs in the machine's own network namespace: mesh-init must refuse (inbound
    // steering there would take the machine's connections) before it changes anything there.
    let cgroup = Cgroup::new("ehost");
    let lo = || {
        String::from_utf8_lossy(&check(Command::new("ip").args(["-6", "addr", "show", "dev", "lo"])).stdout)
            .into_owned()
    };
    let before = lo();
    let out = Command::new(bin("mesh-init")).arg("ebpf").arg("--cgroup").arg(cgroup.path()).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("machine's own network namespace"), "{err}");
    assert_eq!(lo(), before, "the machine's lo is unchanged");
    let out = Command::new(bin("mesh-init"))
        .arg("ebpf")
        .arg("--cgroup")
        .arg(cgroup.path())
        .arg("--cleanup-only")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lo(), before, "cleanup leaves the machine's lo alone");
}

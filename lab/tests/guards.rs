//! The guards against the real kernel: what they create exists while they live and is gone after
//! they drop, also when the test panics.

use std::{panic, path::Path, process::Command, time::Duration};

use mesh_lab::{privileged, wait_until, Cgroup, Netns, Proc, TempDir};

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn namespaces_joined_by_a_veth_talk_and_vanish_on_drop() {
    if !privileged("namespaces_joined_by_a_veth_talk_and_vanish_on_drop") {
        return;
    }
    let (a, b) = (Netns::new("lab-a"), Netns::new("lab-b"));
    a.veth("eth0", &b, "eth0");
    a.ip(&["addr", "add", "10.200.250.1/24", "dev", "eth0"]);
    b.ip(&["addr", "add", "10.200.250.2/24", "dev", "eth0"]);
    let server = b.run(|| std::net::TcpListener::bind("10.200.250.2:0").unwrap());
    let addr = server.local_addr().unwrap();
    a.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))).expect("a reaches b over the veth");
    let names = (a.name().to_string(), b.name().to_string());
    assert!(names.0.starts_with("mesh-lab-a-") && netns_exists(&names.0), "{names:?}");
    drop((a, b));
    assert!(!netns_exists(&names.0) && !netns_exists(&names.1), "{names:?} left behind");
}

#[test]
fn guards_clean_up_when_the_test_panics() {
    if !privileged("guards_clean_up_when_the_test_panics") {
        return;
    }
    let mut made = None;
    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let (ns, cg, dir) = (Netns::new("lab-panic"), Cgroup::new("lab-panic"), TempDir::new("lab-panic"));
        made = Some((ns.name().to_string(), cg.path().to_path_buf(), dir.path().to_path_buf()));
        panic!("a failing test");
    }));
    assert!(result.is_err());
    let (ns, cg, dir) = made.unwrap();
    assert!(!netns_exists(&ns) && !cg.exists() && !dir.exists(), "left behind: {ns} {cg:?} {dir:?}");
}

#[test]
fn a_process_runs_in_the_namespace_and_cgroup_as_the_user_asked() {
    if !privileged("a_process_runs_in_the_namespace_and_cgroup_as_the_user_asked") {
        return;
    }
    let (ns, cg) = (Netns::new("lab-proc"), Cgroup::new("lab-proc"));
    let mut cmd = ns.command_as(1337, 1337, "sh");
    cmd.args(["-c", "echo uid=$(id -u) gid=$(id -g); echo ready; exec sleep 60"]);
    cg.enter(&mut cmd);
    let mut p = Proc::spawn(&mut cmd);
    assert_eq!(p.wait_for_line("uid=").trim(), "uid=1337 gid=1337");
    p.wait_for_line("ready");
    let procs = std::fs::read_to_string(cg.path().join("cgroup.procs")).unwrap();
    assert!(procs.split_whitespace().any(|pid| pid == p.pid().to_string()), "{} not in {procs}", p.pid());
    let ours = std::fs::read_link(format!("/proc/{}/ns/net", p.pid())).unwrap();
    let in_ns = ns.run(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(ours, in_ns, "the process is in the namespace");
    let status = p.signal_and_wait(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(5)).expect("exits");
    assert!(!status.success());
}

#[test]
fn nested_cgroups_go_with_their_guard_or_their_parent() {
    if !privileged("nested_cgroups_go_with_their_guard_or_their_parent") {
        return;
    }
    let parent = Cgroup::new("lab-nest");
    let leaf = parent.nested("kubepods.slice/kubepods-pod1.slice");
    assert!(leaf.path().ends_with("kubepods.slice/kubepods-pod1.slice") && leaf.path().is_dir());
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60");
    leaf.enter(&mut cmd);
    let _sleeper = Proc::spawn(&mut cmd);
    drop(leaf);
    assert!(!parent.path().join("kubepods.slice").exists(), "the nested guard removes what it created");

    // The parent dropping first takes the nested cgroups (and their processes) with it.
    let leaf = parent.nested("a.slice/b.slice");
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("60");
    leaf.enter(&mut cmd);
    let _sleeper = Proc::spawn(&mut cmd);
    let top = parent.path().to_path_buf();
    drop(parent);
    assert!(!top.exists(), "{} left behind", top.display());
    drop(leaf);
}

#[test]
fn a_wait_that_never_ends_names_what_it_waited_for() {
    let e = panic::catch_unwind(|| wait_until(Duration::from_millis(50), "the sun to rise in the west", || None::<()>))
        .unwrap_err();
    let msg = e.downcast_ref::<String>().unwrap();
    assert!(msg.contains("waiting for the sun to rise in the west"), "{msg}");
    assert_eq!(wait_until(Duration::from_secs(1), "a value", || Some(7)), 7);
}

#[test]
fn a_failing_command_is_reported_with_its_output() {
    let e = mesh_lab::run(Command::new("sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10))
        .unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("out") && msg.contains("err") && msg.contains("3"), "{msg}");
    let e = mesh_lab::run(Command::new("sleep").arg("10"), Duration::from_millis(100)).unwrap_err();
    assert!(format!("{e:#}").contains("did not finish in time"), "{e:#}");
}

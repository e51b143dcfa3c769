//! (4) A route that leads back into the proxy: an endpoint that is one of the proxy's own
//! listeners is refused by validation (at start and on reload, the last good config serving
//! on), and a loop that gets through anyway — here through a TCP forwarder validation cannot see
//! — is stopped after one turn by the proxy's `Via` header (508 Loop Detected), instead of
//! eating every descriptor of the pod.

use std::time::Duration;

use mesh_e2e::{bin, POD_V4};
use mesh_lab::{privileged, wait_until, Proc};

use super::lab::{admin_get, config, Client, Lab, B1, ECHO_PY, SERVICE};

/// A TCP forwarder: accepts on argv[1]:argv[2], connects each connection to argv[3]:argv[4].
const FORWARD_PY: &str = r#"
import sys, socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind((sys.argv[1], int(sys.argv[2]))); l.listen(512)
print("ready", flush=True)
def pipe(a, b):
    try:
        while (d := a.recv(65536)):
            b.sendall(d)
    except OSError:
        pass
    for s in (a, b):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
def serve(c):
    u = socket.create_connection((sys.argv[3], int(sys.argv[4])))
    threading.Thread(target=pipe, args=(c, u), daemon=True).start()
    pipe(u, c)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

#[test]
fn an_endpoint_that_is_the_proxys_own_listener_is_refused() {
    if !privileged("an_endpoint_that_is_the_proxys_own_listener_is_refused") {
        return;
    }
    let mut lab = Lab::new("rloop");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);

    // At start: the proxy refuses the config and exits, naming the endpoint.
    lab.write_config(&config(&["127.0.0.1:15000"], ""));
    let mut cmd = lab.net.pod.command_as(1337, 1337, bin("mesh-proxy"));
    cmd.arg("--config").arg(&lab.config);
    let out = mesh_lab::output(&mut cmd, Duration::from_secs(10)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("127.0.0.1:15000") && err.contains("loop"), "{err}");

    // On reload: rejected, the last good config serves on. The pod's address on the listener's
    // port (bound to 0.0.0.0) is the listener too.
    lab.start_proxy(&config(&[B1], ""));
    for looping in ["127.0.0.1:15000".to_string(), format!("{POD_V4}:15000"), "127.0.0.1:15090".to_string()] {
        lab.write_config(&config(&[&looping], ""));
        lab.net.pod.run(|| {
            wait_until(Duration::from_secs(20), &format!("the rejection of {looping}"), || {
                admin_get("/config_dump").1.contains(&format!("{looping} is the proxy's own")).then_some(())
            });
            let r = Client::connect(SERVICE).and_then(|mut c| c.get("/")).unwrap();
            assert_eq!((r.status, r.body_text().starts_with("b1 /")), (200, true), "{looping}: {r:?}");
        });
    }
}

#[test]
fn a_loop_through_another_hop_ends_after_one_turn() {
    if !privileged("a_loop_through_another_hop_ends_after_one_turn") {
        return;
    }
    let mut lab = Lab::new("rloop2");
    // In the pod, as the application: 127.0.0.1:18000 forwards to the proxy's listener.
    let mut cmd = lab.net.pod.command("python3");
    cmd.args(["-u", "-c", FORWARD_PY, "127.0.0.1", "18000", "127.0.0.1", "15000"]);
    let mut fwd = Proc::spawn(&mut cmd);
    fwd.wait_for_line("ready");
    lab.procs.push(fwd);
    lab.start_proxy(&config(&["127.0.0.1:18000"], ""));
    let pid = lab.proxy().pid();
    let before = open_fds(pid);
    lab.net.pod.run(|| {
        // `svc:9080` is a host route: the forwarded request is routed again by its Host.
        let mut c = Client::connect(SERVICE).unwrap();
        c.host = "svc:9080".into();
        let r = c.get("/").unwrap();
        assert_eq!(r.status, 508, "{r:?}");
        assert!(r.body_text().contains("loop"), "{}", r.body_text());
    });
    let after = open_fds(pid);
    assert!(after < before + 20, "descriptors went from {before} to {after}");
}

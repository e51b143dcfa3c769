//! (5) SIGTERM drains the way Istio does: `/ready` says DRAINING at once, listeners keep
//! accepting for the drain period, keep-alive connections are told to close, and the process
//! exits when the work in flight is done (after `drain_minimum`) or the period ends.

use std::{thread, time::Duration};

use mesh_lab::{privileged, wait_until};
use nix::sys::signal::Signal;

use super::lab::{admin_get, config, Client, Lab, B1, ECHO_PY, SERVICE};

fn start(tag: &str, extra: &str) -> Lab {
    let mut lab = Lab::new(tag);
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    lab.start_proxy(&config(&[B1], extra));
    lab
}

fn exit_within(lab: &mut Lab, limit: Duration) -> std::process::ExitStatus {
    let p = lab.proxy();
    wait_until(limit, "mesh-proxy to exit", || p.exit_status())
}

#[test]
fn sigterm_keeps_accepting_tells_connections_to_close_and_exits_0() {
    if !privileged("sigterm_keeps_accepting_tells_connections_to_close_and_exits_0") {
        return;
    }
    let mut lab = start("rdrain", "drain_timeout: 3s\n");
    let (idle, slow) = lab.net.pod.run(|| {
        let mut idle = Client::connect(SERVICE).unwrap();
        assert_eq!(idle.get("/").unwrap().status, 200);
        // A request in flight when the drain begins.
        let slow = thread::spawn(|| {
            let mut c = Client::connect(SERVICE).unwrap();
            c.get("/sleep/1000").unwrap()
        });
        thread::sleep(Duration::from_millis(300));
        (idle, slow)
    });
    lab.proxy().signal(Signal::SIGTERM);
    lab.net.pod.run(|| {
        thread::sleep(Duration::from_millis(200));
        assert_eq!(admin_get("/ready"), (503, "DRAINING\n".to_string()));
        let readiness = Client::connect("10.200.0.1:15021").and_then(|mut c| c.get("/ready")).unwrap();
        assert_eq!(readiness.status, 503);

        // The application keeps working: new connections are accepted and served, each response
        // asking the client to close.
        for _ in 0..3 {
            let mut c = Client::connect(SERVICE).expect("still accepting while draining");
            let r = c.get("/").unwrap();
            assert_eq!(r.status, 200);
            assert_eq!(r.header("connection"), Some("close"), "{r:?}");
            thread::sleep(Duration::from_millis(300));
        }
        // The keep-alive connection idle at the drain's start was closed.
        let mut idle = idle;
        assert!(idle.get("/").is_err(), "the idle keep-alive connection is still open");
        // The request in flight finished, and was told to close too.
        let r = slow.join().unwrap();
        assert_eq!((r.status, r.header("connection")), (200, Some("close")));
    });
    let status = exit_within(&mut lab, Duration::from_secs(10));
    assert!(status.success(), "{status:?}; log:\n{}", lab.log_text());
    assert!(lab.log_text().contains("drained: every connection finished"), "{}", lab.log_text());
}

#[test]
fn the_drain_ends_when_connections_are_done_or_at_its_timeout() {
    if !privileged("the_drain_ends_when_connections_are_done_or_at_its_timeout") {
        return;
    }
    // A request outlasting the drain: the process exits at drain_timeout, saying so.
    let mut lab = start("rdrain2", "drain_timeout: 1s\ndrain_minimum: 200ms\n");
    let stuck = lab.net.pod.run(|| {
        let stuck = thread::spawn(|| Client::connect(SERVICE).unwrap().get("/sleep/5000"));
        thread::sleep(Duration::from_millis(300));
        stuck
    });
    lab.proxy().signal(Signal::SIGTERM);
    let status = exit_within(&mut lab, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(lab.log_text().contains("drain timeout: closing the remaining connections"), "{}", lab.log_text());
    assert!(stuck.join().unwrap().is_err(), "the request outlasting the drain was cut");

    // Nothing open: after drain_minimum the process exits without waiting for drain_timeout.
    let mut lab = start("rdrain3", "drain_timeout: 30s\ndrain_minimum: 200ms\n");
    lab.proxy().signal(Signal::SIGTERM);
    let status = exit_within(&mut lab, Duration::from_secs(20));
    assert!(status.success(), "{status:?}");
    assert!(lab.log_text().contains("drained: every connection finished"), "{}", lab.log_text());
}

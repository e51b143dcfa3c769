//! (10) The readiness port answers on IPv6 as the listeners do. (11) Only the proxy's own user
//! may change it through the admin API (`POST /quitquitquit`, `POST /logging`); the application,
//! under another UID in the same pod, may not.

use std::time::Duration;

use mesh_lab::{output, privileged, wait_until};

use super::lab::{config, Client, Lab, ADMIN, B1, ECHO_PY};

fn lab(tag: &str, extra: &str) -> Lab {
    let mut lab = Lab::new(tag);
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    lab.start_proxy(&config(&[B1], extra));
    lab
}

#[test]
fn the_readiness_port_answers_on_ipv4_and_ipv6() {
    if !privileged("the_readiness_port_answers_on_ipv4_and_ipv6") {
        return;
    }
    let lab = lab("rready6", "");
    // From outside the pod, as the kubelet probes.
    lab.net.remote.run(|| {
        for addr in ["10.200.0.1:15021", "[fd00:200::1]:15021"] {
            let r = Client::connect(addr).and_then(|mut c| c.get("/ready"));
            assert!(matches!(&r, Ok(r) if r.status == 200), "{addr}: {r:?}");
        }
    });
}

/// `curl -X POST` on the admin API from the pod, as `uid`; (HTTP status, body).
fn post_as(lab: &Lab, uid: u32, path: &str) -> (String, String) {
    let mut cmd = lab.net.pod.command_as(uid, uid, "curl");
    cmd.args(["-s", "-m", "5", "-X", "POST", "-w", "\n%{http_code}", &format!("http://{ADMIN}{path}")]);
    let out = output(&mut cmd, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_string(), body.to_string())
}

#[test]
fn only_the_proxys_own_user_may_stop_or_reconfigure_it() {
    if !privileged("only_the_proxys_own_user_may_stop_or_reconfigure_it") {
        return;
    }
    let mut lab = lab("radmin", "drain_timeout: 1s\n");
    // The application (root here, or any other UID) is refused, and the proxy keeps running.
    for uid in [0, 1000] {
        let (code, body) = post_as(&lab, uid, "/quitquitquit");
        assert_eq!(code, "403", "uid {uid}: {body}");
        assert!(body.contains(&format!("this connection is from uid {uid}")), "{body}");
        assert_eq!(post_as(&lab, uid, "/logging?level=debug").0, "403");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.proxy().is_running(), "the proxy stopped on another user's request");
    // Reads stay open to everyone.
    let dump = lab.net.pod.run(|| Client::connect(ADMIN).and_then(|mut c| c.get("/config_dump")).unwrap());
    assert_eq!(dump.status, 200);

    // The proxy's own user (a preStop hook in the sidecar's container) may.
    assert_eq!(post_as(&lab, 1337, "/logging?level=info").0, "200");
    assert_eq!(post_as(&lab, 1337, "/quitquitquit").0, "200");
    let p = lab.proxy();
    let status = wait_until(Duration::from_secs(10), "mesh-proxy to exit", || p.exit_status());
    assert!(status.success());

    // `admin.mutations: anyone` is Istio's behaviour.
    let mut lab = Lab::new("radmin2");
    let (ip, port) = B1.split_once(':').unwrap();
    lab.backend(ECHO_PY, &["b1", ip, port]);
    let open = config(&[B1], "drain_minimum: 100ms\n").replace(
        &format!("admin: {{ address: {ADMIN} }}"),
        &format!("admin: {{ address: {ADMIN}, mutations: anyone }}"),
    );
    lab.start_proxy(&open);
    assert_eq!(post_as(&lab, 0, "/quitquitquit").0, "200");
}

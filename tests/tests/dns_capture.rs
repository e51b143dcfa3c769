//! DNS capture end to end: the pod's real resolver (glibc's `getaddrinfo`, through `getent` and
//! python) and `dig`, over UDP and TCP, to an IPv4 and an IPv6 nameserver, reach the DNS port of
//! the proxy (a responder on 127.0.0.1/::1:15053, as Istio's agent listens) and get its answer
//! back from the nameserver's address — which only happens when conntrack translates the
//! answer back (the zones of the raw table). The proxy's own queries still reach the real
//! nameserver (on the remote, answering other addresses).
//!
//! The pod's resolv.conf is `/etc/netns/<pod>/resolv.conf`, which `ip netns exec` mounts over
//! /etc/resolv.conf for the commands it runs and `mesh-init iptables --netns <pod>` reads.

use std::{fs, path::PathBuf, process::Command};

use mesh_e2e::{bin, script, PodNet, REMOTE_V4, REMOTE_V6};
use mesh_lab::{check, privileged, Proc};

/// What the proxy's DNS port answers, and what the real nameserver answers.
const PROXY_A: &str = "10.99.0.1";
const PROXY_AAAA: &str = "fd00:99::1";
const REAL_A: &str = "10.99.0.2";
const REAL_AAAA: &str = "fd00:99::2";
const NAME: &str = "reviews.mesh.test";

/// `/etc/netns/<pod>/`, removed on drop.
struct NetnsEtc(PathBuf);

impl NetnsEtc {
    fn new(netns: &str) -> NetnsEtc {
        let dir = PathBuf::from("/etc/netns").join(netns);
        fs::create_dir_all(&dir).unwrap();
        NetnsEtc(dir)
    }

    fn resolv_conf(&self, text: &str) {
        fs::write(self.0.join("resolv.conf"), text).unwrap();
    }
}

impl Drop for NetnsEtc {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `argv` in the pod as `ip netns exec` runs it (with the pod's resolv.conf), as `uid`.
fn in_pod(pod: &str, uid: u32, argv: &[&str]) -> String {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", pod, "setpriv", &format!("--reuid={uid}"), &format!("--regid={uid}"), "--clear-groups"]);
    let out = check(cmd.arg("--").args(argv));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The addresses `getaddrinfo` returns for NAME in the pod (python's socket module is glibc's).
fn getaddrinfo(pod: &str, family: &str) -> String {
    let code = format!(
        "import socket\nprint(' '.join(sorted({{a[4][0] for a in socket.getaddrinfo('{NAME}', 80, socket.{family}, \
         socket.SOCK_STREAM)}})))"
    );
    in_pod(pod, 0, &["python3", "-c", &code])
}

fn dns_capture(backend_flags: &[&str]) {
    let net = PodNet::new("dns");
    let pod = net.pod.name();
    let etc = NetnsEtc::new(pod);
    etc.resolv_conf(&format!("nameserver {REMOTE_V4}\nnameserver {REMOTE_V6}\n"));
    let out = check(
        Command::new(bin("mesh-init"))
            .args(["iptables", "--netns", pod, "--dual-stack", "--redirect-dns"])
            .args(backend_flags),
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));

    let mut proxy = Proc::spawn(net.pod.command_as(1337, 1337, "python3").arg(script("dns_server.py")).args([
        "15053",
        PROXY_A,
        PROXY_AAAA,
        "127.0.0.1",
        "::1",
    ]));
    proxy.wait_for_line("ready");
    let mut real = Proc::spawn(
        net.remote
            .command("python3")
            .arg(script("dns_server.py"))
            .args(["53", REAL_A, REAL_AAAA, REMOTE_V4, REMOTE_V6]),
    );
    real.wait_for_line("ready");

    for (server, transport) in [(REMOTE_V4, "udp"), (REMOTE_V4, "tcp"), (REMOTE_V6, "udp"), (REMOTE_V6, "tcp")] {
        // glibc asks the one nameserver listed; `use-vc` makes it use TCP.
        let options = if transport == "tcp" { "options use-vc\n" } else { "" };
        etc.resolv_conf(&format!("nameserver {server}\n{options}"));
        let case = format!("nameserver {server} over {transport}");
        assert_eq!(in_pod(pod, 0, &["getent", "ahostsv4", NAME]).split_whitespace().next(), Some(PROXY_A), "{case}");
        assert_eq!(
            in_pod(pod, 1000, &["getent", "ahostsv6", NAME]).split_whitespace().next(),
            Some(PROXY_AAAA),
            "{case}, another user"
        );
        assert_eq!(getaddrinfo(pod, "AF_UNSPEC"), format!("{PROXY_A} {PROXY_AAAA}"), "{case}: A and AAAA at once");
        let dig = ["dig", &format!("@{server}"), NAME, "A", "+short", "+tries=1", "+time=2"];
        let tcp = if transport == "tcp" { "+tcp" } else { "+notcp" };
        assert_eq!(in_pod(pod, 0, &[&dig[..], &[tcp]].concat()), PROXY_A, "dig, {case}");
        // The proxy's own queries go to the real nameserver.
        assert_eq!(in_pod(pod, 1337, &[&dig[..], &[tcp]].concat()), REAL_A, "the proxy's dig, {case}");
    }
}

#[test]
fn dns_resolves_through_the_capture_iptables() {
    if !privileged("dns_resolves_through_the_capture_iptables") {
        return;
    }
    dns_capture(&[]);
}

#[test]
fn dns_resolves_through_the_capture_native_nftables() {
    if !privileged("dns_resolves_through_the_capture_native_nftables") {
        return;
    }
    dns_capture(&["--native-nftables"]);
}

//! What only the iptables mode has: dry runs, golden files accepted by the real
//! `iptables-restore`, both backends, TPROXY, istio-validation and large rule sets (DNS capture:
//! `dns_capture.rs`).

use std::{
    fs,
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use mesh_e2e::{bin, script, PodNet, POD_V4, REMOTE_V4};
use mesh_lab::{check, privileged, Netns, Proc};

/// Feeds `text` to `<restore> --test` inside `ns`; returns stderr on failure.
fn restore_test(ns: &Netns, restore: &str, text: &str) -> Result<(), String> {
    let mut child = ns
        .command(restore)
        .args(["--noflush", "--test"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn restore");
    // A write error means restore exited early; its status and stderr say why.
    let _ = child.stdin.take().unwrap().write_all(text.as_bytes());
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Splits golden/dry-run output into (IPv4 text, IPv6 text) at the `# IPv6:` header.
fn split_families(text: &str) -> (String, String) {
    let at = text.find("# IPv6:").unwrap_or(text.len());
    (text[..at].to_string(), text[at..].to_string())
}

#[test]
fn golden_files_are_accepted_by_every_backend() {
    if !privileged("golden_files_are_accepted_by_every_backend") {
        return;
    }
    let ns = Netns::new("golden");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../mesh-init/tests/golden");
    let (mut rules, mut nft) = (0, 0);
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        match path.extension().and_then(|e| e.to_str()) {
            Some("rules") => {
                let (v4, v6) = split_families(&text);
                for backend in ["nft", "legacy"] {
                    for (restore, text) in
                        [(format!("iptables-{backend}-restore"), &v4), (format!("ip6tables-{backend}-restore"), &v6)]
                    {
                        restore_test(&ns, &restore, text)
                            .unwrap_or_else(|e| panic!("{} rejected by {restore}: {e}", path.display()));
                    }
                }
                rules += 1;
            }
            Some("nft") => {
                let mut child = ns.command("nft").args(["-c", "-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
                child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
                assert!(child.wait().unwrap().success(), "{} rejected by nft -c", path.display());
                nft += 1;
            }
            _ => {}
        }
    }
    assert!(rules >= 13 && nft == rules, "expected the golden files in {}: {rules} .rules, {nft} .nft", dir.display());
}

#[test]
fn dry_run_needs_no_root_and_prints_valid_input() {
    if !privileged("dry_run_needs_no_root_and_prints_valid_input") {
        return;
    }
    // As `nobody`, outside any namespace: it must not need privileges or change anything.
    let out = check(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(bin("mesh-init"))
            .args([
                "iptables",
                "--dry-run",
                "--dual-stack",
                "-i",
                "*",
                "-b",
                "*",
                "-d",
                "15090,15021",
                "-x",
                "10.96.0.0/12",
            ]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN"), "{text}");
    let (v4, v6) = split_families(&text);
    assert!(!v6.is_empty(), "--dual-stack prints the IPv6 half");
    let ns = Netns::new("dry");
    restore_test(&ns, "iptables-restore", &v4).unwrap();
    restore_test(&ns, "ip6tables-restore", &v6).unwrap();
    assert!(!ns.sh("iptables-save").contains("ISTIO"), "--test changed nothing");
}

#[test]
fn legacy_backend_is_used_when_asked_and_then_detected() {
    if !privileged("legacy_backend_is_used_when_asked_and_then_detected") {
        return;
    }
    let ns = Netns::new("legacy");
    let init = |args: &[&str]| {
        let out = check(Command::new(bin("mesh-init")).args(["iptables", "--netns", ns.name(), "-i", "*"]).args(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(init(&["--iptables-backend", "legacy"]).contains("(legacy)"));
    assert!(ns.sh("iptables-legacy-save -t nat").contains("-A OUTPUT -j ISTIO_OUTPUT"));
    assert!(!ns.sh("iptables-nft-save -t nat").contains("ISTIO"), "nothing written to nf_tables");
    // With rules in the legacy tables, auto must follow them rather than split the rule set.
    assert!(init(&[]).contains("(legacy)"), "auto detects the legacy rules");
    assert!(init(&["--cleanup-only"]).contains("(legacy)"));
    assert!(!ns.sh("iptables-legacy-save").contains("ISTIO"));
}

#[test]
fn thousand_ports_and_cidrs_apply_and_work() {
    if !privileged("thousand_ports_and_cidrs_apply_and_work") {
        return;
    }
    let net = PodNet::new("scale");
    let ports: Vec<String> = (0..1000).map(|i| (20000 + 3 * i).to_string()).collect();
    let cidrs: Vec<String> = (0..1000).map(|i| format!("10.{}.{}.128/25", 100 + i / 250, i % 250)).collect();
    let out = check(Command::new(bin("mesh-init")).args([
        "iptables",
        "--netns",
        net.pod.name(),
        "-p",
        "15000",
        "-i",
        "*",
        "-o",
        &ports.join(","),
        "-x",
        &cidrs.join(","),
    ]));
    let summary = String::from_utf8_lossy(&out.stdout);
    let rules = net.pod.sh("iptables-save -t nat | grep -c '^-A ISTIO_OUTPUT'");
    let rules: usize = rules.trim().parse().unwrap();
    // 1,000 CIDRs, and the ports in 67 multiport rules for TCP and again for UDP.
    assert!(rules < 1000 + 2 * 67 + 20, "ports are packed: {rules} rules in ISTIO_OUTPUT ({summary})");
    // 20003 is excluded, 20004 is not.
    let mut proxy =
        Proc::spawn(net.pod.command_as(1337, 1337, "python3").arg(script("origdst_server.py")).arg("15000"));
    proxy.wait_for_line("ready");
    let mut remote =
        Proc::spawn(net.remote.command("python3").arg(script("origdst_server.py")).args(["20003", "20004"]));
    remote.wait_for_line("ready");
    let probe = |port: u16| net.pod.sh(&format!("python3 {} {REMOTE_V4}:{port}", script("probe.py").display()));
    assert!(probe(20003).contains("port=20003"), "excluded port goes direct");
    assert!(probe(20004).contains("port=15000"), "other ports are captured");
}

#[test]
fn tproxy_delivers_inbound_with_the_client_address_kept() {
    if !privileged("tproxy_delivers_inbound_with_the_client_address_kept") {
        return;
    }
    tproxy(&[]);
}

#[test]
fn tproxy_delivers_inbound_with_the_client_address_kept_native_nftables() {
    if !privileged("tproxy_delivers_inbound_with_the_client_address_kept_native_nftables") {
        return;
    }
    tproxy(&["--native-nftables"]);
}

fn tproxy(backend: &[&str]) {
    let net = PodNet::new("tproxy");
    let flags = ["-m", "TPROXY", "-i", "*", "-b", "*", "-d", "8081"];
    check(Command::new(bin("mesh-init")).args(["iptables", "--netns", net.pod.name()]).args(flags).args(backend));
    // IP_TRANSPARENT needs CAP_NET_ADMIN: give the proxy UID just that, as a sidecar would get it.
    let mut cmd = net.pod.command("setpriv");
    cmd.args([
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "--inh-caps=+net_admin",
        "--ambient-caps=+net_admin",
        "--",
        "env",
        "TRANSPARENT=1",
        "python3",
    ])
    .arg(script("origdst_server.py"))
    .arg("15006");
    let mut proxy = Proc::spawn(&mut cmd);
    proxy.wait_for_line("ready");
    let mut app = Proc::spawn(net.pod.command("python3").arg(script("origdst_server.py")).arg("8081"));
    app.wait_for_line("ready");
    let probe = |addr: &str| net.remote.sh(&format!("python3 {} {addr}", script("probe.py").display()));
    let r = probe(&format!("{POD_V4}:8080"));
    assert!(r.contains("port=15006"), "inbound goes to the TPROXY port: {r}");
    assert!(r.contains("local=10.200.0.1:8080"), "the destination is kept: {r}");
    assert!(r.contains("peer=10.200.0.2:"), "the client's address is kept: {r}");
    assert!(probe(&format!("{POD_V4}:8081")).contains("port=8081"), "excluded port reaches the app");
    assert!(net.pod.sh("ip rule").contains("fwmark 0x539 lookup 133"));
    // The proxy's own connection to the pod through `lo` is marked 1338 and sent to the inbound
    // port; the reply of the application to a TPROXY'd connection finds its way back.
    let mut cmd = net.pod.command_as(1337, 1337, "python3");
    let r = String::from_utf8(check(cmd.arg(script("probe.py")).arg(format!("{POD_V4}:8080"))).stdout).unwrap();
    assert!(r.contains("port=15006"), "the proxy calling its own pod goes to the inbound port: {r}");
    check(Command::new(bin("mesh-init")).args(["iptables", "--netns", net.pod.name(), "--cleanup-only"]).args(backend));
    assert!(!net.pod.sh("ip rule").contains("lookup 133"), "cleanup removes the policy route");
}

#[test]
fn run_validation_proves_the_proxys_self_call_rule_and_fails_with_126() {
    if !privileged("run_validation_proves_the_proxys_self_call_rule_and_fails_with_126") {
        return;
    }
    let ns = Netns::new("vld");
    // As istio-validation runs: the proxy's UID, nothing installed by this command.
    let validate = || {
        ns.command_as(1337, 1337, bin("mesh-init"))
            .args(["iptables", "--run-validation", "--skip-rule-apply", "--probe-timeout", "1s"])
            .output()
            .unwrap()
    };
    let out = validate();
    assert_eq!(out.status.code(), Some(126), "no rules: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("validation failed"));
    // istio-iptables' defaults alone install the rule that sends the proxy's calls to its own pod
    // (here 127.0.0.6) to the inbound port.
    check(Command::new(bin("mesh-init")).args(["iptables", "--netns", ns.name()]));
    let out = validate();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("127.0.0.6:15002"));
}

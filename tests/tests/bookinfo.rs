//! The BookInfo walk-through's short mode: the README's demo, with its distributions asserted
//! by the demo's own client (all v1; v1/v3 each within 35-65% of 200 requests; jason → v2 only).
//! The iptables run takes its rules from mesh-pilot (Istio's files, the proxy started as the
//! injector starts it), the eBPF run from the proxy's own file.

use std::process::Command;

use mesh_e2e::bin;
use mesh_lab::privileged;

fn demo(mode: &str, control: &str) {
    let dir = bin("mesh-init").parent().unwrap().to_path_buf();
    bin("mesh-proxy");
    bin("mesh-pilot");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(["--short", "--no-build", "--mode", mode, "--control", control])
        .env("MESH_BIN_DIR", &dir)
        .output()
        .expect("run demo.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo --short --mode {mode} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["(a) all reviews traffic to v1", "(b) reviews 50/50", "(c) requests of end-user jason"] {
        assert!(stdout.contains(step), "missing step {step:?}:\n{stdout}");
    }
    assert!(!stdout.contains("FAILED"), "{stdout}");
    if control == "pilot" {
        // mesh-pilot's status table after each step: the proxy, named by the injected variables.
        assert_eq!(stdout.matches("productpage-v1-0.default").count(), 3, "{stdout}");
    }
}

#[test]
fn bookinfo_short_iptables() {
    if privileged("bookinfo_short_iptables") {
        demo("iptables", "pilot");
    }
}

#[test]
fn bookinfo_short_ebpf() {
    if privileged("bookinfo_short_ebpf") {
        demo("ebpf", "file");
    }
}

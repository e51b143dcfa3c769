//! The benchmark harness itself works: its quick mode on a tiny load (one repeat, 1 s wrk and
//! iperf3 runs, 400 fixed-rate requests, 200 idle connections) for the direct and HAProxy paths,
//! and the rule-install benchmark, produce a report with every table's rows and the SVG.
//! Performance is never asserted here: the numbers of such a short run mean nothing.
//!
//! Needs root (network namespaces): skipped without it, except when `CI` is set, where it fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// target/<profile>/deps/<this test> → target/<profile>, where `cargo test --workspace` (and
/// scripts/test.sh's `cargo build --workspace --bins`) put mesh-init and mesh-proxy.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps").to_path_buf()
}

#[test]
fn quick_mode_on_a_tiny_load_writes_every_table() {
    if !mesh_lab::privileged("quick_mode_on_a_tiny_load_writes_every_table") {
        return;
    }
    let bins = bin_dir();
    for b in ["mesh-init", "mesh-proxy"] {
        assert!(bins.join(b).is_file(), "{} is missing: build the workspace's binaries first", bins.join(b).display());
    }
    let dir = mesh_lab::TempDir::new("bench-test");
    let out = dir.path();
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "--quick", "--paths", "direct,haproxy", "--repeats", "1", "--duration", "1"])
        .args(["--rate", "200", "--idle-conns", "200", "--bin-dir"])
        .arg(&bins)
        .arg("--out")
        .arg(out)
        .status()
        .expect("run xtask bench");
    let md = std::fs::read_to_string(out.join("results.md"));
    let svg = std::fs::read_to_string(out.join("latency.svg"));
    assert!(status.success(), "xtask bench failed ({status}); results.md:\n{}", md.as_deref().unwrap_or("(none)"));
    let md = md.expect("results.md");
    for heading in [
        "## HTTP/1.1 keep-alive",
        "## A new connection per request",
        "## Fixed rate",
        "## HTTP/2",
        "## TCP bulk throughput",
        "## Memory",
        "## Rule installation",
        "## Goals",
    ] {
        assert!(md.contains(heading), "results.md lacks {heading:?}:\n{md}");
    }
    // A row per path in each load table it runs (direct: 4, no HTTP/2 and no memory; HAProxy: 6), with numbers.
    assert_eq!(md.matches("\n| direct | ").count(), 4, "direct rows:\n{md}");
    assert_eq!(md.matches("\n| haproxy (iptables) | ").count(), 6, "haproxy rows:\n{md}");
    assert!(md.contains("\n| default rules | "), "default rules row:\n{md}");
    assert!(md.contains("\n| 1,000 excluded ports + 1,000 excluded CIDRs | "), "scale rules row:\n{md}");
    assert!(md.contains("cargo xtask bench --quick"), "the command is recorded:\n{md}");
    for line in md.lines().filter(|l| l.starts_with("| direct |") || l.starts_with("| haproxy (iptables) |")) {
        assert!(line.chars().any(|c| c.is_ascii_digit()), "a row without figures: {line}");
    }
    let svg = svg.expect("latency.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>") && svg.contains("haproxy (iptables)"),
        "latency.svg:\n{svg}"
    );
}

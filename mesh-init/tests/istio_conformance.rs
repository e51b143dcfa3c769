//! Istio's own test cases, as verdicts: every case of istio-iptables' `capture/run_test.go` (27)
//! and of the CNI plugin's `plugin_dryrun_test.go` (9), with that case's flags and environment,
//! must give every packet of `istio/packets.txt` the verdict istio-iptables' rules give it
//! (`istio/<case>.verdicts`, derived by simulating Istio's rules for those packets).
//!
//! Our side is the plan `mesh-init iptables` installs for the same flags, followed by the
//! evaluator `mesh-init trace` uses. Where a case sets a field directly (Istio's tests fill
//! `DNSServersV4` themselves), the fake machine below answers instead: its resolv.conf, its
//! group names (`java`, `ftp`) and its environment.

use std::{collections::HashMap, io, path::PathBuf};

use clap::Parser;
use mesh_init::{
    capture::{CaptureArgs, Host},
    rules::{self, Family},
    trace::{evaluate, Packet},
};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    capture: CaptureArgs,
}

/// One Istio test case.
struct Case {
    /// `capture-<name>` or `cni-<name>`, the name of its verdict file.
    name: &'static str,
    args: &'static [&'static str],
    /// Environment variables istio-iptables reads without a flag.
    env: &'static [(&'static str, &'static str)],
    /// The resolvers of the pod (Istio's cases set them directly).
    resolv: &'static str,
    /// Whether the case programs IPv6 too (`EnableIPv6`).
    ipv6: bool,
}

/// The machine Istio's cases assume: no `istio-proxy` user (so the proxy UID is 1337), the
/// groups their owner-group cases name, the case's environment and resolvers.
struct CaseHost<'a>(&'a Case);

impl Host for CaseHost<'_> {
    fn user_id(&self, _name: &str) -> Option<u32> {
        None
    }
    fn group_id(&self, name: &str) -> Option<u32> {
        HashMap::from([("java", 4001), ("ftp", 4002)]).get(name).copied()
    }
    fn env(&self, name: &str) -> Option<String> {
        self.0.env.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
    }
    fn resolv_conf(&self) -> (PathBuf, io::Result<String>) {
        ("resolv.conf".into(), Ok(self.0.resolv.to_string()))
    }
}

const NO_DNS: &str = "";
const DNS4: &str = "nameserver 127.0.0.53\n";
const DNS46: &str = "nameserver 127.0.0.53\nnameserver ::127.0.0.53\n";

/// The CNI plugin's fixed settings: port 15001, status port 15020 excluded both ways, the
/// injector's inbound exclusions, everything else captured.
macro_rules! cni {
    ($($extra:expr),* $(,)?) => {
        &["--cni-mode", "-i", "*", "-b", "*", "-d", "15020,15021,15090", "-o", "15020", $($extra),*]
    };
}

/// The cases and their settings, in the order of Istio's test files. `--cni-mode` is not a
/// capture flag: the CNI cases drop it (it only changes the xtables lock).
const CASES: &[Case] = &[
    Case { name: "capture-ipv6-empty-inbound-ports", args: &["-b", ""], env: &[], resolv: NO_DNS, ipv6: true },
    Case {
        name: "capture-ip-range",
        args: &["-x", "1.1.0.0/16", "-i", "9.9.0.0/16", "--redirect-dns", "-g", "1,2", "-u", "3,4"],
        env: &[],
        resolv: DNS4,
        ipv6: false,
    },
    Case {
        name: "capture-tproxy",
        args: &[
            "-m",
            "TPROXY",
            "-b",
            "*",
            "-x",
            "1.1.0.0/16",
            "-i",
            "9.9.0.0/16",
            "--redirect-dns",
            "-g",
            "1337",
            "-u",
            "1337",
            "-c",
            "not-istio-nic",
        ],
        env: &[],
        resolv: DNS4,
        ipv6: true,
    },
    Case { name: "capture-ipv6-inbound-ports", args: &["-b", "4000,5000"], env: &[], resolv: NO_DNS, ipv6: true },
    Case {
        name: "capture-ipv6-virt-interfaces",
        args: &["-b", "4000,5000", "-k", "eth0,eth1"],
        env: &[],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-ipv6-ipnets",
        args: &["-b", "4000,5000", "-d", "6000,7000,", "-k", "eth0,eth1", "-x", "2001:db8::/32", "-i", "2001:db8::/32"],
        env: &[],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-ipv6-uid-gid",
        args: &[
            "-b",
            "4000,5000",
            "-d",
            "6000,7000",
            "-k",
            "eth0,eth1",
            "-g",
            "1,2",
            "-u",
            "3,4",
            "-x",
            "2001:db8::/32",
            "-i",
            "2001:db8::/32",
        ],
        env: &[],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-ipv6-outbound-ports",
        args: &["-b", "", "-q", "32000,31000"],
        env: &[],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case { name: "capture-empty", args: &[], env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "capture-kube-virt-interfaces",
        args: &["-k", "eth1,eth2", "-i", "*"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case { name: "capture-ipnets", args: &["-i", "10.0.0.0/8"], env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "capture-ipnets-with-kube-virt-interfaces",
        args: &["-k", "eth1,eth2", "-i", "10.0.0.0/8"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case { name: "capture-inbound-ports-include", args: &["-b", "32000,31000"], env: &[], resolv: NO_DNS, ipv6: false },
    Case { name: "capture-inbound-ports-wildcard", args: &["-b", "*"], env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "capture-inbound-ports-tproxy",
        args: &["-b", "32000,31000", "-m", "TPROXY"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "capture-inbound-ports-wildcard-tproxy",
        args: &["-b", "*", "-m", "TPROXY"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "capture-dns-uid-gid",
        args: &["--redirect-dns", "-g", "1,2", "-u", "3,4"],
        env: &[],
        resolv: DNS46,
        ipv6: true,
    },
    Case {
        name: "capture-ipv6-dns-uid-gid",
        args: &["--redirect-dns", "-g", "1,2", "-u", "3,4"],
        env: &[],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-outbound-owner-groups",
        args: &[],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "capture-outbound-owner-groups-exclude",
        args: &[],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "capture-ipv6-dns-outbound-owner-groups",
        args: &["--redirect-dns"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-ipv6-dns-outbound-owner-groups-exclude",
        args: &["--redirect-dns"],
        env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")],
        resolv: NO_DNS,
        ipv6: true,
    },
    Case {
        name: "capture-outbound-ports-include",
        args: &["-q", "32000,31000"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "capture-loopback-outbound-iprange",
        args: &["-i", "127.1.2.3/32", "--redirect-dns", "-g", "1,2", "-u", "3,4"],
        env: &[],
        resolv: DNS4,
        ipv6: false,
    },
    Case { name: "capture-basic-exclude-nic", args: &["-c", "not-istio-nic"], env: &[], resolv: NO_DNS, ipv6: false },
    Case { name: "capture-drop-invalid", args: &["--drop-invalid"], env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "capture-host-ipv4-loopback-cidr",
        args: &[],
        env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case { name: "cni-basic", args: cni!(), env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "cni-include-exclude-ip",
        args: &[
            "--cni-mode",
            "-i",
            "127.0.0.0/8",
            "-x",
            "10.0.0.0/8",
            "-b",
            "*",
            "-d",
            "15020,15021,15090",
            "-o",
            "15020",
        ],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case {
        name: "cni-include-exclude-ports",
        args: &["--cni-mode", "-i", "*", "-b", "1111,2222", "-d", "3333,4444,15020,15021,15090", "-o", "5555,6666"],
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    Case { name: "cni-tproxy", args: cni!("-m", "TPROXY"), env: &[], resolv: NO_DNS, ipv6: false },
    Case { name: "cni-dns", args: cni!("--redirect-dns", "--capture-all-dns"), env: &[], resolv: NO_DNS, ipv6: false },
    Case { name: "cni-invalid-drop", args: cni!(), env: &[("INVALID_DROP", "true")], resolv: NO_DNS, ipv6: false },
    Case {
        name: "cni-custom-uid",
        args: cni!("-u", "1000670000", "-g", "1000670001"),
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
    // The plugin turns a proxy UID of 0 into 1337: the same flags as `basic`.
    Case { name: "cni-custom-uid-zero", args: cni!(), env: &[], resolv: NO_DNS, ipv6: false },
    Case {
        name: "cni-custom-uid-tproxy",
        args: cni!("-u", "1000670000", "-g", "1000670001", "-m", "TPROXY"),
        env: &[],
        resolv: NO_DNS,
        ipv6: false,
    },
];

fn read(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/istio").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `NAME REST` lines, comments and blank lines skipped.
fn lines(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once(char::is_whitespace).map_or((l, ""), |(a, b)| (a, b.trim())))
}

/// Differences from Istio's verdicts for one case, as readable lines.
fn differences(case: &Case) -> Vec<String> {
    let host = CaseHost(case);
    // The CNI cases' `--cni-mode` belongs to `mesh-init iptables`, not to the capture flags.
    let mut argv = vec!["mesh-init"];
    argv.extend(case.args.iter().filter(|a| **a != "--cni-mode"));
    let cfg = Cli::try_parse_from(&argv)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
        .capture
        .validate_with(&host)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let plans = [rules::plan(&cfg, Family::V4), rules::plan(&cfg, Family::V6)];
    let packets: HashMap<&str, Packet> = {
        let text = Box::leak(read("packets.txt").into_boxed_str());
        lines(text).map(|(name, flags)| (name, Packet::from_line(flags, &host).expect(name))).collect()
    };
    let expected = read(&format!("{}.verdicts", case.name));
    let mut diffs = Vec::new();
    let mut seen = 0;
    for (name, want) in lines(&expected) {
        let pkt = packets.get(name).unwrap_or_else(|| panic!("{}: packet {name} is not in packets.txt", case.name));
        let got = evaluate(&plans[usize::from(pkt.family() == Family::V6)], pkt).verdict.to_string();
        if got != want {
            diffs.push(format!("{}: {name} ({pkt}): Istio {want}, mesh-init {got}", case.name));
        }
        seen += 1;
    }
    let families = if case.ipv6 { 2 } else { 1 };
    let per_family = packets.len() / 2;
    assert_eq!(seen, per_family * families, "{}: every packet of the case's families has a verdict", case.name);
    diffs
}

#[test]
fn all_36_istio_cases_give_istios_verdicts() {
    assert_eq!(CASES.len(), 36);
    let diffs: Vec<String> = CASES.iter().flat_map(differences).collect();
    let failing: std::collections::BTreeSet<&str> =
        diffs.iter().map(|d| d.split(':').next().unwrap_or_default()).collect();
    assert!(
        diffs.is_empty(),
        "{} of 36 cases differ from Istio ({} packets):\n{}",
        failing.len(),
        diffs.len(),
        diffs.join("\n")
    );
}

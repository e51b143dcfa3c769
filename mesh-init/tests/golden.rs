//! Golden files of the rendered rules for a table of flag combinations.
//!
//! Each case renders the IPv4 and the IPv6 plan into `tests/golden/<case>.rules` (iptables-restore
//! input) and `tests/golden/<case>.nft` (`nft -f` input, `--native-nftables`). A change to the
//! rules shows up as a diff of these files in review. Regenerate with `UPDATE_GOLDEN=1 cargo test
//! -p mesh-init --test golden` and read the diff before committing it. The e2e crate feeds every
//! file to the real `iptables-restore --test` and `nft -c -f`.

use std::{fmt::Write, path::PathBuf};

use clap::Parser;
use mesh_init::{
    capture::CaptureArgs,
    rules::{self, Family},
};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    capture: CaptureArgs,
}

/// The rendering of `argv`'s plans: iptables-restore input, or with `nft` an `nft -f` script.
fn render(argv: &[&str], nft: bool) -> String {
    let mut full = vec!["mesh-init"];
    full.extend_from_slice(argv);
    let cfg = Cli::try_parse_from(full).expect("flags parse").capture.validate().expect("flags validate");
    let mut out = String::new();
    for family in [Family::V4, Family::V6] {
        let plan = rules::plan(&cfg, family);
        if nft {
            writeln!(out, "# {family}: nft -f -").unwrap();
            out.push_str(&rules::render_nft(&plan));
        } else {
            let restore = if family == Family::V4 { "iptables-restore" } else { "ip6tables-restore" };
            writeln!(out, "# {family}: {restore} --noflush").unwrap();
            out.push_str(&rules::render(&plan));
        }
    }
    out
}

fn check(case: &str, argv: &[&str]) {
    check_one(case, argv, false);
    check_one(case, argv, true);
}

fn check_one(case: &str, argv: &[&str], nft: bool) {
    let ext = if nft { "nft" } else { "rules" };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{case}.{ext}"));
    // iptables-restore reads lines into a fixed buffer: long lists are summarised in the header.
    // Paths are shown relative to the crate, so the file does not depend on the checkout.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/");
    let shown: Vec<String> = argv
        .iter()
        .map(|a| if a.len() > 60 { format!("<{} items>", a.split(',').count()) } else { a.replace(dir, "") })
        .collect();
    let native = if nft { " --native-nftables" } else { "" };
    let got = format!("# mesh-init iptables{native} {}\n{}", shown.join(" "), render(argv, nft));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with UPDATE_GOLDEN=1 to create it", path.display()));
    assert!(
        got == want,
        "{case}: rendered rules differ from {}; rerun with UPDATE_GOLDEN=1 and review the diff\n{got}",
        path.display()
    );
}

/// istio-iptables' defaults: nothing captured but the proxy's own loopback self-calls.
#[test]
fn defaults() {
    check("defaults", &[]);
}

/// What Istio's injector passes (capture everything, the proxy's ports excluded inbound).
#[test]
fn istio_injector_flags() {
    check(
        "istio_injector",
        &[
            "-p",
            "15001",
            "-z",
            "15006",
            "-u",
            "1337",
            "-m",
            "REDIRECT",
            "-i",
            "*",
            "-x",
            "",
            "-b",
            "*",
            "-d",
            "15090,15021,15020",
        ],
    );
}

#[test]
fn include_and_exclude_cidrs_and_ports() {
    check(
        "include_exclude",
        &[
            "-i",
            "10.96.0.0/12,fd00:96::/108",
            "-x",
            "10.96.0.1/32,169.254.169.254,fd00:96::1",
            "-q",
            "3306,5432",
            "-o",
            "25,8000-8010",
            "-b",
            "8080,9090,9091",
            "-d",
            "9090",
        ],
    );
}

#[test]
fn several_uids_and_gids() {
    check("several_owners", &["-i", "*", "-b", "*", "-u", "1337,1338", "-g", "1337,2000"]);
}

#[test]
fn tproxy() {
    check("tproxy", &["-i", "*", "-b", "*", "-m", "TPROXY", "-d", "15090,15021,15020"]);
}

/// DNS to the resolvers of a resolv.conf (one of each family), and to everything.
#[test]
fn dns_capture() {
    let resolv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/resolv.conf");
    check("dns", &["-i", "*", "-b", "*", "--redirect-dns", "--resolv-conf", resolv.to_str().unwrap()]);
    check("dns_all", &["-i", "*", "-b", "*", "--redirect-dns", "--capture-all-dns"]);
}

#[test]
fn excluded_interfaces() {
    check("exclude_interfaces", &["-i", "*", "-b", "*", "-c", "eth1,cni0"]);
}

#[test]
fn kube_virt_interfaces() {
    check("kube_virt_interfaces", &["-i", "10.0.0.0/8", "-b", "*", "-k", "eth1,eth2"]);
}

#[test]
fn no_inbound_capture() {
    check("inbound_none", &["-i", "*", "-b", ""]);
}

#[test]
fn no_outbound_cidr_capture_but_ports() {
    check("outbound_ports_only", &["-i", "", "-b", "*", "-q", "80,443"]);
}

#[test]
fn drop_invalid_and_owner_groups() {
    check(
        "drop_invalid_owner_groups",
        &["-i", "*", "-b", "*", "--drop-invalid", "--outbound-owner-groups-exclude", "888,999"],
    );
}

/// 1,000 excluded ports and 1,000 excluded CIDRs: packing keeps this a few dozen port rules.
#[test]
fn thousand_ports_and_cidrs() {
    let (ports, cidrs) = thousand_ports_and_cidrs_flags();
    let argv = ["-i", "*", "-b", "*", "-d", &ports, "-o", &ports, "-x", &cidrs];
    check("scale", &argv);
    let rendered = render(&argv, false);
    let port_rules = rendered.lines().filter(|l| l.contains("--dports")).count();
    // 1,000 isolated ports, 15 a rule: inbound once, outbound for TCP and UDP, in two families.
    assert_eq!(port_rules, 2 * 3 * 1000_usize.div_ceil(15));
}

/// Non-adjacent ports and CIDRs, so that neither ranges nor aggregation shrink them.
pub fn thousand_ports_and_cidrs_flags() -> (String, String) {
    let ports: Vec<String> = (0..1000).map(|i| (20000 + 3 * i).to_string()).collect();
    let cidrs: Vec<String> = (0..1000).map(|i| format!("10.{}.{}.128/25", 100 + i / 250, i % 250)).collect();
    (ports.join(","), cidrs.join(","))
}

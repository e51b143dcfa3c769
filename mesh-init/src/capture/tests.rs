use std::{collections::HashMap, io, path::PathBuf};

use clap::Parser;

use super::*;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: CaptureArgs,
}

/// A machine with a few users and groups, fixed environment variables and resolv.conf.
#[derive(Default)]
struct Fake {
    env: HashMap<&'static str, &'static str>,
    resolv: Option<&'static str>,
}

impl Host for Fake {
    fn user_id(&self, name: &str) -> Option<u32> {
        [("istio-proxy", 1337), ("web", 33)].into_iter().find(|(n, _)| *n == name).map(|(_, id)| id)
    }
    fn group_id(&self, name: &str) -> Option<u32> {
        [("istio-proxy", 1337), ("java", 4001)].into_iter().find(|(n, _)| *n == name).map(|(_, id)| id)
    }
    fn env(&self, name: &str) -> Option<String> {
        self.env.get(name).map(|v| v.to_string())
    }
    fn resolv_conf(&self) -> (PathBuf, io::Result<String>) {
        let text = self.resolv.map(str::to_string).ok_or_else(|| io::Error::from(io::ErrorKind::NotFound));
        ("/etc/resolv.conf".into(), text)
    }
}

fn parse_on(host: &Fake, argv: &[&str]) -> Result<CaptureConfig, InvalidFlag> {
    let mut full = vec!["x"];
    full.extend_from_slice(argv);
    Cli::try_parse_from(full).expect("clap accepts").args.validate_with(host)
}

fn parse(argv: &[&str]) -> Result<CaptureConfig, InvalidFlag> {
    parse_on(&Fake::default(), argv)
}

#[test]
fn defaults_are_istio_iptables_defaults() {
    let c = parse(&[]).unwrap();
    assert_eq!((c.outbound_port, c.inbound_port, c.tunnel_port), (15001, 15006, 15008));
    assert_eq!((c.proxy_uids.as_slice(), c.proxy_gids.as_slice()), (&[1337][..], &[1337][..]));
    assert!(c.include_cidrs.is_none(), "istio-iptables captures no outbound CIDR unless -i says so");
    assert!(c.include_inbound_ports.is_none(), "nor inbound ports unless -b says so");
    assert_eq!(c.inbound_mode, InboundMode::Redirect);
    assert_eq!((c.tproxy_mark, c.tproxy_table), (1337, 133));
    assert_eq!(c.dns, None);
    assert_eq!(c.owner_groups, OwnerGroups::AllExcept(vec![]));
    assert_eq!(c.ipv4_loopback.to_string(), "127.0.0.1/32");
}

#[test]
fn proxy_uid_defaults_to_envoy_user() {
    let host = Fake { env: HashMap::from([("ENVOY_USER", "web")]), ..Fake::default() };
    let c = parse_on(&host, &[]).unwrap();
    assert_eq!(c.proxy_uids, vec![33]);
    // The UID list as written is reused for -g: the number 33 is a GID as well.
    assert_eq!(c.proxy_gids, vec![33]);
}

#[test]
fn names_resolve_like_iptables_does() {
    let c = parse(&["-u", "istio-proxy,1000", "-g", "java"]).unwrap();
    assert_eq!((c.proxy_uids, c.proxy_gids), (vec![1337, 1000], vec![4001]));
    let e = parse(&["-u", "nobody-here"]).unwrap_err();
    assert_eq!((e.flag, e.value.as_str()), ("--proxy-uid", "nobody-here"));
}

#[test]
fn istio_injector_flags_are_accepted() {
    let c =
        parse(&["-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*"]).unwrap();
    assert_eq!((c.outbound_port, c.inbound_port), (15001, 15006));
    assert_eq!(c.include_cidrs, Selection::All);
    assert!(c.exclude_cidrs.is_empty());
}

#[test]
fn dns_capture_follows_resolv_conf() {
    let host = Fake { resolv: Some("nameserver 10.96.0.10\nnameserver fd00::a\n"), ..Fake::default() };
    let c = parse_on(&host, &["--redirect-dns"]).unwrap();
    let servers = vec!["10.96.0.10".parse().unwrap(), "fd00::a".parse().unwrap()];
    assert_eq!(c.dns, Some(DnsCapture { port: 15053, servers: DnsServers::Only(servers) }));
    let all = parse_on(&host, &["--redirect-dns", "--capture-all-dns"]).unwrap();
    assert_eq!(all.dns.unwrap().servers, DnsServers::All);
    // No nameserver: istio-iptables turns DNS capture off (with a warning).
    let empty = Fake { resolv: Some("search x\n"), ..Fake::default() };
    assert_eq!(parse_on(&empty, &["--redirect-dns"]).unwrap().dns, None);
    let e = parse_on(&Fake::default(), &["--redirect-dns"]).unwrap_err();
    assert_eq!(e.flag, "--redirect-dns");
}

#[test]
fn istio_environment_aliases_switch_flags_on() {
    let host = Fake {
        env: HashMap::from([("ISTIO_META_DNS_CAPTURE", "True"), ("INVALID_DROP", "1")]),
        resolv: Some("nameserver 10.96.0.10\n"),
    };
    let c = parse_on(&host, &[]).unwrap();
    assert!(c.dns.is_some() && c.drop_invalid);
    let bad = Fake { env: HashMap::from([("INVALID_DROP", "maybe")]), ..Fake::default() };
    assert_eq!(parse_on(&bad, &[]).unwrap_err().flag, "INVALID_DROP");
}

#[test]
fn owner_groups_include_or_exclude() {
    let c = parse(&["--outbound-owner-groups", "java,202"]).unwrap();
    assert_eq!(c.owner_groups, OwnerGroups::Only(vec![4001, 202]));
    let c = parse(&["--outbound-owner-groups-exclude", "888,java"]).unwrap();
    assert_eq!(c.owner_groups, OwnerGroups::AllExcept(vec![888, 4001]));
    let many: Vec<String> = (1..=65).map(|g| g.to_string()).collect();
    assert_eq!(parse(&["--outbound-owner-groups", &many.join(",")]).unwrap_err().flag, "--outbound-owner-groups");
}

#[test]
fn loopback_in_the_include_list_is_noticed() {
    assert!(parse(&["-i", "127.1.2.3/32"]).unwrap().include_has_loopback);
    assert!(!parse(&["-i", "10.0.0.0/8"]).unwrap().include_has_loopback);
}

#[test]
fn empty_service_cidr_means_no_outbound_capture() {
    let c = parse(&["-i", ""]).unwrap();
    assert!(c.include_cidrs.is_none());
}

#[test]
fn bad_values_name_their_flag() {
    let cases: &[(&[&str], &str, &str)] = &[
        (&["-p", "70000"], "--envoy-port", "70000"),
        (&["-z", "0"], "--inbound-capture-port", "0"),
        (&["-e", "x"], "--inbound-tunnel-port", "x"),
        (&["-u", "13a7"], "--proxy-uid", "13a7"),
        (&["-g", "1,x"], "--proxy-gid", "x"),
        (&["-x", "10.0.0.0/33"], "--istio-service-exclude-cidr", "10.0.0.0/33"),
        (&["-i", "bogus"], "--istio-service-cidr", "bogus"),
        (&["-d", "80,99999"], "--istio-local-exclude-ports", "99999"),
        (&["-o", "20-10"], "--istio-local-outbound-ports-exclude", "20-10"),
        (&["-c", "eth0/1"], "--istio-exclude-interfaces", "eth0/1"),
        (&["-k", "a b"], "--kube-virt-interfaces", "a b"),
        (&["-m", "MAGIC"], "--istio-inbound-interception-mode", "MAGIC"),
        (&["-t", "0"], "--istio-inbound-tproxy-mark", "0"),
        (&["-t", "1338"], "--istio-inbound-tproxy-mark", "1338"),
        (&["-r", "main"], "--istio-inbound-tproxy-route-table", "main"),
        (&["--dns-port", "0"], "--dns-port", "0"),
        (&["--outbound-ipv4-loopback-cidr", "10.0.0.1/32"], "--outbound-ipv4-loopback-cidr", "10.0.0.1/32"),
        (&["--outbound-ipv4-loopback-cidr", "127.0.0.1/7"], "--outbound-ipv4-loopback-cidr", "127.0.0.1/7"),
    ];
    for (argv, flag, value) in cases {
        let e = parse(argv).expect_err(&format!("{argv:?} must be rejected"));
        assert_eq!(e.flag, *flag, "{argv:?}");
        assert_eq!(e.value, *value, "{argv:?}");
        let msg = e.to_string();
        assert!(msg.contains(flag) && msg.contains(value), "{msg}");
    }
}

#[test]
fn cidrs_are_normalised_and_deduplicated() {
    let c = parse(&["-x", "10.1.2.3/8, 10.0.0.0/8,fd00::1,192.168.1.1"]).unwrap();
    let shown: Vec<String> = c.exclude_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(shown, ["10.0.0.0/8", "fd00::1/128", "192.168.1.1/32"]);
}

#[test]
fn port_ranges_expand() {
    let c = parse(&["-o", "8000-8002,22"]).unwrap();
    assert_eq!(c.exclude_outbound_ports, BTreeSet::from([22, 8000, 8001, 8002]));
}

#[test]
fn booleans_read_like_istio_reads_them() {
    for (v, want) in [("1", true), ("t", true), ("TRUE", true), ("0", false), ("False", false)] {
        assert_eq!(parse::go_bool(v), Ok(want), "{v}");
    }
    assert!(parse::go_bool("yes").is_err());
}

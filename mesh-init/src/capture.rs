//! What to capture: the one flag set shared by every interception mode.
//!
//! `mesh-init iptables`, `mesh-init ebpf` and `mesh-init validate` accept the same flags, with
//! istio-iptables' names, short letters and environment variables, so an Istio injector template
//! works unchanged. The raw strings are parsed once, here, into a [`CaptureConfig`]; every mode
//! builds its plan from that type and never sees a string again. A bad value is reported with the
//! flag that carried it and what would have been accepted, before anything is changed.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

/// The flags, as the user gave them (command line or environment).
#[derive(Debug, Clone, clap::Args)]
pub struct CaptureArgs {
    /// Port the proxy listens on for redirected outbound traffic.
    #[arg(short = 'p', long = "envoy-port", visible_alias = "proxy-port", env = "ENVOY_PORT", default_value = "15000")]
    pub envoy_port: String,

    /// Port the proxy listens on for redirected inbound traffic [default: same as --envoy-port].
    #[arg(short = 'z', long = "inbound-capture-port", env = "INBOUND_CAPTURE_PORT")]
    pub inbound_capture_port: Option<String>,

    /// UIDs whose traffic is never redirected (the proxy's), comma separated.
    #[arg(short = 'u', long = "proxy-uid", env = "PROXY_UID", default_value = "1337")]
    pub proxy_uid: String,

    /// GIDs whose traffic is never redirected, comma separated [default: same as --proxy-uid].
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID")]
    pub proxy_gid: Option<String>,

    /// Outbound destination CIDRs to capture: `*` for all, empty for none.
    #[arg(short = 'i', long = "istio-service-cidr", env = "ISTIO_SERVICE_CIDR", default_value = "*")]
    pub service_cidr: String,

    /// Outbound destination CIDRs never captured (IPv4 and IPv6), comma separated.
    #[arg(short = 'x', long = "istio-service-exclude-cidr", env = "ISTIO_SERVICE_EXCLUDE_CIDR", default_value = "")]
    pub service_exclude_cidr: String,

    /// Outbound destination ports to capture whatever the CIDR, comma separated.
    #[arg(short = 'q', long = "istio-outbound-ports", env = "ISTIO_OUTBOUND_PORTS", default_value = "")]
    pub outbound_ports: String,

    /// Outbound destination ports never captured, comma separated.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub outbound_ports_exclude: String,

    /// Inbound destination ports to capture: `*` for all, empty for none.
    #[arg(short = 'b', long = "istio-inbound-ports", env = "ISTIO_INBOUND_PORTS", default_value = "*")]
    pub inbound_ports: String,

    /// Inbound destination ports never captured, comma separated.
    #[arg(short = 'd', long = "istio-local-exclude-ports", env = "ISTIO_LOCAL_EXCLUDE_PORTS", default_value = "")]
    pub inbound_ports_exclude: String,

    /// Interfaces whose traffic is never captured, comma separated.
    #[arg(short = 'c', long = "istio-exclude-interfaces", env = "ISTIO_EXCLUDE_INTERFACES", default_value = "")]
    pub exclude_interfaces: String,

    /// How inbound traffic reaches the proxy: REDIRECT (nat) or TPROXY (mangle, keeps the source).
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = "REDIRECT"
    )]
    pub inbound_interception_mode: String,

    /// Capture DNS (UDP and TCP port 53) to the proxy's DNS port.
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS")]
    pub redirect_dns: bool,

    /// The proxy's DNS port, used with --redirect-dns.
    #[arg(long = "dns-port", env = "DNS_PORT", default_value = "15053")]
    pub dns_port: String,
}

/// Inbound interception: how PREROUTING traffic is handed to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum InboundMode {
    /// nat REDIRECT: the proxy sees the original destination through `SO_ORIGINAL_DST`.
    Redirect,
    /// mangle TPROXY: the packet is delivered unchanged to a transparent listener, which keeps the
    /// client's source address visible to the application.
    Tproxy,
}

/// A set that is either "everything" (`*`) or an explicit list (possibly empty = nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Selection<T: Ord> {
    All,
    Only(BTreeSet<T>),
}

impl<T: Ord> Selection<T> {
    pub fn is_none(&self) -> bool {
        matches!(self, Selection::Only(s) if s.is_empty())
    }
}

/// The validated capture settings every mode builds its plan from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// Where captured outbound connections are sent.
    pub outbound_port: u16,
    /// Where captured inbound connections are sent.
    pub inbound_port: u16,
    /// Owners exempt from capture: the proxy's own connections must reach their real destination.
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// Outbound destinations captured.
    pub include_cidrs: Selection<IpNet>,
    /// Outbound destinations never captured; checked before `include_cidrs`.
    pub exclude_cidrs: Vec<IpNet>,
    /// Outbound ports captured whatever `include_cidrs` says; empty means "by CIDR".
    pub include_outbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub include_inbound_ports: Selection<u16>,
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub exclude_interfaces: Vec<String>,
    pub inbound_mode: InboundMode,
    /// `Some(port)` when DNS is captured.
    pub dns_port: Option<u16>,
}

/// A flag whose value could not be accepted. Nothing has been changed when this is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct InvalidFlag {
    pub flag: &'static str,
    pub value: String,
    pub reason: String,
}

impl InvalidFlag {
    fn new(flag: &'static str, value: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self { flag, value: value.into(), reason: reason.to_string() }
    }
}

impl CaptureArgs {
    /// Parses and cross-checks every flag. The first bad value wins, named with its flag.
    pub fn validate(&self) -> Result<CaptureConfig, InvalidFlag> {
        let outbound_port = parse_port("--envoy-port", &self.envoy_port, false)?;
        let inbound_port = match &self.inbound_capture_port {
            Some(p) if !p.trim().is_empty() => parse_port("--inbound-capture-port", p, false)?,
            _ => outbound_port,
        };
        let proxy_uids = parse_ids("--proxy-uid", &self.proxy_uid)?;
        let proxy_gids = match &self.proxy_gid {
            Some(g) if !g.trim().is_empty() => parse_ids("--proxy-gid", g)?,
            _ => proxy_uids.clone(),
        };
        if proxy_uids.is_empty() {
            return Err(InvalidFlag::new(
                "--proxy-uid",
                &self.proxy_uid,
                "at least one UID is needed, or the proxy's own traffic would loop back to it",
            ));
        }
        let include_cidrs = match self.service_cidr.trim() {
            "*" => Selection::All,
            s => Selection::Only(parse_cidrs("--istio-service-cidr", s)?.into_iter().collect()),
        };
        let exclude_cidrs = parse_cidrs("--istio-service-exclude-cidr", &self.service_exclude_cidr)?;
        let include_outbound_ports = parse_ports("--istio-outbound-ports", &self.outbound_ports)?;
        let exclude_outbound_ports = parse_ports("--istio-local-outbound-ports-exclude", &self.outbound_ports_exclude)?;
        let include_inbound_ports = match self.inbound_ports.trim() {
            "*" => Selection::All,
            s => Selection::Only(parse_ports("--istio-inbound-ports", s)?),
        };
        let exclude_inbound_ports = parse_ports("--istio-local-exclude-ports", &self.inbound_ports_exclude)?;
        let exclude_interfaces = parse_interfaces(&self.exclude_interfaces)?;
        let inbound_mode = match self.inbound_interception_mode.trim() {
            m if m.eq_ignore_ascii_case("REDIRECT") => InboundMode::Redirect,
            m if m.eq_ignore_ascii_case("TPROXY") => InboundMode::Tproxy,
            m => return Err(InvalidFlag::new("--istio-inbound-interception-mode", m, "expected REDIRECT or TPROXY")),
        };
        let dns_port = parse_port("--dns-port", &self.dns_port, false)?;
        Ok(CaptureConfig {
            outbound_port,
            inbound_port,
            proxy_uids,
            proxy_gids,
            include_cidrs,
            exclude_cidrs,
            include_outbound_ports,
            exclude_outbound_ports,
            include_inbound_ports,
            exclude_inbound_ports,
            exclude_interfaces,
            inbound_mode,
            dns_port: self.redirect_dns.then_some(dns_port),
        })
    }
}

fn items(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

fn parse_port(flag: &'static str, s: &str, zero_ok: bool) -> Result<u16, InvalidFlag> {
    match s.trim().parse::<u16>() {
        Ok(0) if !zero_ok => Err(InvalidFlag::new(flag, s, "expected a port from 1 to 65535")),
        Ok(p) => Ok(p),
        Err(_) => Err(InvalidFlag::new(flag, s, "expected a port from 1 to 65535")),
    }
}

/// A comma list of ports; `a:b` or `a-b` ranges are accepted and expanded.
fn parse_ports(flag: &'static str, list: &str) -> Result<BTreeSet<u16>, InvalidFlag> {
    let mut out = BTreeSet::new();
    for item in items(list) {
        if let Some((a, b)) = item.split_once([':', '-']) {
            let (a, b) = (parse_port(flag, a, false)?, parse_port(flag, b, false)?);
            if a > b {
                return Err(InvalidFlag::new(flag, item, "a port range must go from low to high"));
            }
            out.extend(a..=b);
        } else {
            out.insert(parse_port(flag, item, false).map_err(|e| InvalidFlag { value: item.into(), ..e })?);
        }
    }
    Ok(out)
}

fn parse_ids(flag: &'static str, list: &str) -> Result<Vec<u32>, InvalidFlag> {
    let mut out = Vec::new();
    for item in items(list) {
        let id = item
            .parse::<u32>()
            .map_err(|_| InvalidFlag::new(flag, item, "expected a numeric ID from 0 to 4294967294"))?;
        if id == u32::MAX {
            return Err(InvalidFlag::new(flag, item, "4294967295 is not a valid ID"));
        }
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A comma list of CIDRs; a bare address means a single host.
fn parse_cidrs(flag: &'static str, list: &str) -> Result<Vec<IpNet>, InvalidFlag> {
    let mut out: Vec<IpNet> = Vec::new();
    for item in items(list) {
        let net = match item.parse::<IpNet>() {
            Ok(n) => n.trunc(),
            Err(_) => match item.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) => {
                    return Err(InvalidFlag::new(
                        flag,
                        item,
                        "expected an IPv4 or IPv6 CIDR such as 10.96.0.0/12 or fd00::/8",
                    ))
                }
            },
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    Ok(out)
}

/// Interface names as the kernel accepts them (IFNAMSIZ, no '/', no whitespace).
fn parse_interfaces(list: &str) -> Result<Vec<String>, InvalidFlag> {
    let mut out = Vec::new();
    for item in items(list) {
        let bad = item.len() > 15
            || item == "."
            || item == ".."
            || item.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if bad {
            return Err(InvalidFlag::new(
                "--istio-exclude-interfaces",
                item,
                "expected an interface name of 1-15 characters without '/', ':' or spaces",
            ));
        }
        if !out.iter().any(|i| i == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CaptureArgs,
    }

    fn parse(argv: &[&str]) -> Result<CaptureConfig, InvalidFlag> {
        let mut full = vec!["x"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("clap accepts").args.validate()
    }

    #[test]
    fn defaults_follow_the_original_design() {
        let c = parse(&[]).unwrap();
        assert_eq!((c.outbound_port, c.inbound_port), (15000, 15000));
        assert_eq!(c.proxy_uids, vec![1337]);
        assert_eq!(c.proxy_gids, vec![1337]);
        assert_eq!(c.include_cidrs, Selection::All);
        assert_eq!(c.include_inbound_ports, Selection::All);
        assert_eq!(c.inbound_mode, InboundMode::Redirect);
        assert_eq!(c.dns_port, None);
    }

    #[test]
    fn istio_injector_flags_are_accepted() {
        let c = parse(&[
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
        ])
        .unwrap();
        assert_eq!((c.outbound_port, c.inbound_port), (15001, 15006));
        assert_eq!(c.exclude_inbound_ports, BTreeSet::from([15020, 15021, 15090]));
        assert!(c.exclude_cidrs.is_empty());
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
            (&["-u", "13a7"], "--proxy-uid", "13a7"),
            (&["-g", "1,x"], "--proxy-gid", "x"),
            (&["-x", "10.0.0.0/33"], "--istio-service-exclude-cidr", "10.0.0.0/33"),
            (&["-i", "bogus"], "--istio-service-cidr", "bogus"),
            (&["-d", "80,99999"], "--istio-local-exclude-ports", "99999"),
            (&["-o", "20-10"], "--istio-local-outbound-ports-exclude", "20-10"),
            (&["-c", "eth0/1"], "--istio-exclude-interfaces", "eth0/1"),
            (&["-m", "MAGIC"], "--istio-inbound-interception-mode", "MAGIC"),
            (&["--dns-port", "0"], "--dns-port", "0"),
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
}

//! What to capture: the one flag set shared by every interception mode.
//!
//! `mesh-init iptables`, `ebpf`, `validate` and `trace` accept istio-iptables' flags, with its
//! names, short letters, environment variables and defaults (those of `tools/istio-iptables`:
//! `-p 15001`, `-z 15006`, `-e 15008`, nothing captured unless `-i`/`-b` say so), so an Istio
//! injector template or CNI configuration works unchanged. The raw strings are parsed once, here,
//! into a [`CaptureConfig`]; every mode builds its plan from that type and never sees a string
//! again. A bad value is reported with the flag that carried it and what would have been
//! accepted, before anything is changed.
//!
//! - [`host`]: user and group names, the environment variables istio-iptables reads without a
//!   flag, and the pod's resolv.conf;
//! - [`parse`]: the value grammars (ports, IDs, CIDRs, interfaces, booleans).

pub mod host;
mod parse;

use std::{collections::BTreeSet, fmt, net::IpAddr, path::PathBuf};

pub use host::{Host, System};
use ipnet::{IpNet, Ipv4Net};
use mesh_common::{flags, ports};
pub use parse::go_bool;
use parse::IdKind;
use serde::Serialize;

/// The flags, as the user gave them (command line or environment).
#[derive(Debug, Clone, clap::Args)]
pub struct CaptureArgs {
    /// Port the proxy listens on for redirected outbound traffic.
    #[arg(
        short = flags::ENVOY_PORT.short,
        long = flags::ENVOY_PORT.long,
        visible_alias = "proxy-port",
        env = flags::ENVOY_PORT.env,
        default_value = ports::ISTIO_OUTBOUND_TEXT
    )]
    pub envoy_port: String,

    /// Port the proxy listens on for redirected inbound traffic.
    #[arg(short = 'z', long = "inbound-capture-port", env = "INBOUND_CAPTURE_PORT", default_value = ports::ISTIO_INBOUND_TEXT)]
    pub inbound_capture_port: Option<String>,

    /// The proxy's tunnel (HBONE) port: inbound traffic to it is never captured, nor the proxy's
    /// own connections to it through `lo`.
    #[arg(short = 'e', long = "inbound-tunnel-port", env = "INBOUND_TUNNEL_PORT", default_value = ports::ISTIO_TUNNEL_TEXT)]
    pub inbound_tunnel_port: String,

    /// UIDs (numbers or user names) whose traffic is never redirected, comma separated [default:
    /// the UID of the user $ENVOY_USER (istio-proxy), else 1337].
    #[arg(short = 'u', long = "proxy-uid", env = "PROXY_UID")]
    pub proxy_uid: Option<String>,

    /// GIDs (numbers or group names) whose traffic is never redirected [default: same as --proxy-uid].
    #[arg(short = 'g', long = "proxy-gid", env = "PROXY_GID")]
    pub proxy_gid: Option<String>,

    /// Outbound destination CIDRs to capture: `*` for all, empty for none.
    #[arg(short = 'i', long = "istio-service-cidr", env = "ISTIO_SERVICE_CIDR", default_value = "")]
    pub service_cidr: String,

    /// Outbound destination CIDRs never captured (IPv4 and IPv6), comma separated.
    #[arg(short = 'x', long = "istio-service-exclude-cidr", env = "ISTIO_SERVICE_EXCLUDE_CIDR", default_value = "")]
    pub service_exclude_cidr: String,

    /// Outbound destination ports to capture whatever the CIDR, comma separated.
    #[arg(short = 'q', long = "istio-outbound-ports", env = "ISTIO_OUTBOUND_PORTS", default_value = "")]
    pub outbound_ports: String,

    /// Outbound destination ports never captured (TCP and UDP), comma separated.
    #[arg(
        short = 'o',
        long = "istio-local-outbound-ports-exclude",
        env = "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
        default_value = ""
    )]
    pub outbound_ports_exclude: String,

    /// Inbound destination ports to capture: `*` for all, empty for none.
    #[arg(short = 'b', long = "istio-inbound-ports", env = "ISTIO_INBOUND_PORTS", default_value = "")]
    pub inbound_ports: String,

    /// Inbound destination ports never captured, comma separated; only with `-b '*'`.
    #[arg(short = 'd', long = "istio-local-exclude-ports", env = "ISTIO_LOCAL_EXCLUDE_PORTS", default_value = "")]
    pub inbound_ports_exclude: String,

    /// Interfaces whose traffic is never captured (inbound and outbound), comma separated.
    #[arg(short = 'c', long = "istio-exclude-interfaces", env = "ISTIO_EXCLUDE_INTERFACES", default_value = "")]
    pub exclude_interfaces: String,

    /// Virtual interfaces (KubeVirt) whose inbound traffic is treated as the pod's outbound.
    #[arg(short = 'k', long = "kube-virt-interfaces", env = "KUBE_VIRT_INTERFACES", default_value = "")]
    pub kube_virt_interfaces: String,

    /// How inbound traffic reaches the proxy: REDIRECT (nat) or TPROXY (mangle, keeps the source).
    #[arg(
        short = 'm',
        long = "istio-inbound-interception-mode",
        env = "ISTIO_INBOUND_INTERCEPTION_MODE",
        default_value = "REDIRECT"
    )]
    pub inbound_interception_mode: String,

    /// TPROXY: the firewall mark of packets for the transparent listener.
    #[arg(short = 't', long = "istio-inbound-tproxy-mark", env = "ISTIO_INBOUND_TPROXY_MARK", default_value = "1337")]
    pub tproxy_mark: String,

    /// TPROXY: the routing table that delivers marked packets locally.
    #[arg(
        short = 'r',
        long = "istio-inbound-tproxy-route-table",
        env = "ISTIO_INBOUND_TPROXY_ROUTE_TABLE",
        default_value = "133"
    )]
    pub tproxy_route_table: String,

    /// Capture DNS (UDP and TCP port 53) to the resolvers of resolv.conf to the proxy's DNS port
    /// (also set by ISTIO_META_DNS_CAPTURE).
    #[arg(long = "redirect-dns", env = "REDIRECT_DNS", action = clap::ArgAction::SetTrue, value_parser = parse::go_bool)]
    pub redirect_dns: bool,

    /// With --redirect-dns: capture DNS to every destination, not only the resolvers of resolv.conf.
    #[arg(long = "capture-all-dns", env = "CAPTURE_ALL_DNS", action = clap::ArgAction::SetTrue, value_parser = parse::go_bool)]
    pub capture_all_dns: bool,

    /// The proxy's DNS port, used with --redirect-dns (istio-iptables: always 15053).
    #[arg(long = "dns-port", env = "DNS_PORT", default_value = ports::ISTIO_DNS_TEXT)]
    pub dns_port: String,

    /// The resolv.conf whose nameservers DNS capture is limited to [default: /etc/netns/NAME/resolv.conf
    /// with --netns NAME when it exists, else /etc/resolv.conf].
    #[arg(long = "resolv-conf")]
    pub resolv_conf: Option<PathBuf>,

    /// Drop inbound packets conntrack finds INVALID instead of letting them reset connections
    /// (also set by INVALID_DROP).
    #[arg(long = "drop-invalid", env = "DROP_INVALID", action = clap::ArgAction::SetTrue, value_parser = parse::go_bool)]
    pub drop_invalid: bool,

    /// Groups (GIDs or names) whose outbound traffic is captured: `*` for all (istio-iptables:
    /// environment only).
    #[arg(long = "outbound-owner-groups", env = "ISTIO_OUTBOUND_OWNER_GROUPS", default_value = "*")]
    pub outbound_owner_groups: String,

    /// With `--outbound-owner-groups '*'`: groups whose outbound traffic is not captured
    /// (istio-iptables: environment only).
    #[arg(long = "outbound-owner-groups-exclude", env = "ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", default_value = "")]
    pub outbound_owner_groups_exclude: String,

    /// The IPv4 loopback range the application's own loopback traffic uses, never captured
    /// (istio-iptables: environment only).
    #[arg(
        long = "outbound-ipv4-loopback-cidr",
        env = "ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR",
        default_value = "127.0.0.1/32"
    )]
    pub ipv4_loopback_cidr: String,
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

/// Which groups' outbound traffic is captured (`ISTIO_OUTBOUND_OWNER_GROUPS` and `_EXCLUDE`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum OwnerGroups {
    /// Every group but these.
    AllExcept(Vec<u32>),
    /// Only these groups (none: no outbound capture at all, as istio-iptables does).
    Only(Vec<u32>),
}

/// Where DNS capture applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum DnsServers {
    /// `--capture-all-dns`: port 53 to any destination.
    All,
    /// The nameservers of resolv.conf (at least one).
    Only(Vec<IpAddr>),
}

/// DNS capture: port 53 to `servers` goes to the proxy's `port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsCapture {
    pub port: u16,
    pub servers: DnsServers,
}

/// The validated capture settings every mode builds its plan from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CaptureConfig {
    /// Where captured outbound connections are sent.
    pub outbound_port: u16,
    /// Where captured inbound connections are sent.
    pub inbound_port: u16,
    /// Never captured inbound; the proxy's own self-calls to it are not sent to `inbound_port`.
    pub tunnel_port: u16,
    /// Owners exempt from capture: the proxy's own connections must reach their real destination.
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// Outbound destinations captured.
    pub include_cidrs: Selection<IpNet>,
    /// Whether an included CIDR was written with a loopback address: the application's own
    /// loopback traffic is then not exempted (istio-iptables' rule).
    pub include_has_loopback: bool,
    /// Outbound destinations never captured; checked before `include_cidrs`.
    pub exclude_cidrs: Vec<IpNet>,
    /// Outbound ports captured whatever `include_cidrs` says; empty means "by CIDR".
    pub include_outbound_ports: BTreeSet<u16>,
    pub exclude_outbound_ports: BTreeSet<u16>,
    pub include_inbound_ports: Selection<u16>,
    /// Only applied with `include_inbound_ports` = all, as in istio-iptables.
    pub exclude_inbound_ports: BTreeSet<u16>,
    pub exclude_interfaces: Vec<String>,
    /// Inbound traffic from these interfaces is routed like the pod's outbound traffic.
    pub kube_virt_interfaces: Vec<String>,
    pub inbound_mode: InboundMode,
    /// TPROXY's firewall mark and routing table.
    pub tproxy_mark: u32,
    pub tproxy_table: u32,
    /// `Some` when DNS is captured.
    pub dns: Option<DnsCapture>,
    pub drop_invalid: bool,
    pub owner_groups: OwnerGroups,
    /// The IPv4 range of the application's loopback traffic (`127.0.0.1/32` by default).
    pub ipv4_loopback: Ipv4Net,
}

impl CaptureConfig {
    /// Whether any inbound traffic is captured (`-b` not empty).
    pub fn inbound_captured(&self) -> bool {
        !self.include_inbound_ports.is_none()
    }
}

#[cfg(test)]
impl CaptureConfig {
    /// Everything captured on Istio's ports, nothing else set: the base other modules' tests vary.
    pub(crate) fn capture_all() -> CaptureConfig {
        CaptureConfig {
            outbound_port: 15001,
            inbound_port: 15006,
            tunnel_port: 15008,
            proxy_uids: vec![1337],
            proxy_gids: vec![1337],
            include_cidrs: Selection::All,
            include_has_loopback: false,
            exclude_cidrs: vec![],
            include_outbound_ports: BTreeSet::new(),
            exclude_outbound_ports: BTreeSet::new(),
            include_inbound_ports: Selection::All,
            exclude_inbound_ports: BTreeSet::new(),
            exclude_interfaces: vec![],
            kube_virt_interfaces: vec![],
            inbound_mode: InboundMode::Redirect,
            tproxy_mark: 1337,
            tproxy_table: 133,
            dns: None,
            drop_invalid: false,
            owner_groups: OwnerGroups::AllExcept(vec![]),
            ipv4_loopback: "127.0.0.1/32".parse().expect("literal"),
        }
    }
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

/// istio-iptables' fallback proxy UID when `ENVOY_USER` names no user.
const DEFAULT_PROXY_UID: u32 = mesh_common::PROXY_UID;

impl CaptureArgs {
    /// Parses and cross-checks every flag against the real machine. The first bad value wins,
    /// named with its flag.
    pub fn validate(&self) -> Result<CaptureConfig, InvalidFlag> {
        self.validate_with(&System::new(self.resolv_conf.as_deref(), None))
    }

    /// [`validate`](Self::validate) for the pod in network namespace `netns` (a name or path):
    /// its resolv.conf is the one `ip netns exec` shows it.
    pub fn validate_for(&self, netns: Option<&str>) -> Result<CaptureConfig, InvalidFlag> {
        self.validate_with(&System::new(self.resolv_conf.as_deref(), netns))
    }

    /// [`validate`](Self::validate) with the machine's answers given by `host`.
    pub fn validate_with(&self, host: &dyn Host) -> Result<CaptureConfig, InvalidFlag> {
        let outbound_port = parse::port("--envoy-port", &self.envoy_port)?;
        let inbound_port = match &self.inbound_capture_port {
            Some(p) if !p.trim().is_empty() => parse::port("--inbound-capture-port", p)?,
            _ => outbound_port,
        };
        let tunnel_port = parse::port("--inbound-tunnel-port", &self.inbound_tunnel_port)?;
        let uid_list = match &self.proxy_uid {
            Some(u) if !u.trim().is_empty() => u.clone(),
            _ => {
                let user = host.env("ENVOY_USER").unwrap_or_else(|| "istio-proxy".into());
                host.user_id(&user).unwrap_or(DEFAULT_PROXY_UID).to_string()
            }
        };
        let proxy_uids = parse::ids("--proxy-uid", &uid_list, IdKind::User, host)?;
        let proxy_gids = match &self.proxy_gid {
            Some(g) if !g.trim().is_empty() => parse::ids("--proxy-gid", g, IdKind::Group, host)?,
            // istio-iptables reuses the UID list as it was written, so names are looked up as groups.
            _ => parse::ids("--proxy-uid", &uid_list, IdKind::Group, host).map_err(|e| InvalidFlag {
                reason: format!("{}, as --proxy-gid defaults to --proxy-uid; give --proxy-gid", e.reason),
                ..e
            })?,
        };
        if proxy_uids.is_empty() {
            return Err(InvalidFlag::new(
                "--proxy-uid",
                &uid_list,
                "at least one UID is needed, or the proxy's own traffic would loop back to it",
            ));
        }
        let (include_cidrs, include_has_loopback) = match self.service_cidr.trim() {
            "*" => (Selection::All, false),
            s => {
                let (nets, loopback) = parse::cidrs("--istio-service-cidr", s)?;
                (Selection::Only(nets.into_iter().collect()), loopback)
            }
        };
        let (exclude_cidrs, _) = parse::cidrs("--istio-service-exclude-cidr", &self.service_exclude_cidr)?;
        let include_outbound_ports = parse::ports("--istio-outbound-ports", &self.outbound_ports)?;
        let exclude_outbound_ports =
            parse::ports("--istio-local-outbound-ports-exclude", &self.outbound_ports_exclude)?;
        let include_inbound_ports = match self.inbound_ports.trim() {
            "*" => Selection::All,
            s => Selection::Only(parse::ports("--istio-inbound-ports", s)?),
        };
        let exclude_inbound_ports = parse::ports("--istio-local-exclude-ports", &self.inbound_ports_exclude)?;
        let exclude_interfaces = parse::interfaces("--istio-exclude-interfaces", &self.exclude_interfaces)?;
        let kube_virt_interfaces = parse::interfaces("--kube-virt-interfaces", &self.kube_virt_interfaces)?;
        let inbound_mode = match self.inbound_interception_mode.trim() {
            // istio-iptables treats anything but TPROXY (an empty value included) as REDIRECT.
            m if m.is_empty() || m.eq_ignore_ascii_case("REDIRECT") => InboundMode::Redirect,
            m if m.eq_ignore_ascii_case("TPROXY") => InboundMode::Tproxy,
            m => return Err(InvalidFlag::new("--istio-inbound-interception-mode", m, "expected REDIRECT or TPROXY")),
        };
        let tproxy_mark = parse::number("--istio-inbound-tproxy-mark", &self.tproxy_mark)?;
        if tproxy_mark == OUTBOUND_MARK {
            return Err(InvalidFlag::new(
                "--istio-inbound-tproxy-mark",
                &self.tproxy_mark,
                format!("{OUTBOUND_MARK} marks the proxy's own connections to the pod; choose another mark"),
            ));
        }
        let tproxy_table = parse::number("--istio-inbound-tproxy-route-table", &self.tproxy_route_table)?;
        let dns_port = parse::port("--dns-port", &self.dns_port)?;
        let redirect_dns = self.redirect_dns || env_bool(host, "ISTIO_META_DNS_CAPTURE")?;
        let dns = if redirect_dns { dns_capture(host, dns_port, self.capture_all_dns)? } else { None };
        let drop_invalid = self.drop_invalid || env_bool(host, "INVALID_DROP")?;
        let owner_groups = owner_groups(host, &self.outbound_owner_groups, &self.outbound_owner_groups_exclude)?;
        let ipv4_loopback = ipv4_loopback(&self.ipv4_loopback_cidr)?;
        Ok(CaptureConfig {
            outbound_port,
            inbound_port,
            tunnel_port,
            proxy_uids,
            proxy_gids,
            include_cidrs,
            include_has_loopback,
            exclude_cidrs,
            include_outbound_ports,
            exclude_outbound_ports,
            include_inbound_ports,
            exclude_inbound_ports,
            exclude_interfaces,
            kube_virt_interfaces,
            inbound_mode,
            tproxy_mark,
            tproxy_table,
            dns,
            drop_invalid,
            owner_groups,
            ipv4_loopback,
        })
    }
}

/// The mark the TPROXY mode gives the proxy's own connections to the pod (istio-iptables' fixed
/// value), so that they are told apart from the application's on `lo`.
pub const OUTBOUND_MARK: u32 = 1338;

/// One of the environment variables istio-iptables also accepts for a boolean flag.
fn env_bool(host: &dyn Host, name: &'static str) -> Result<bool, InvalidFlag> {
    match host.env(name) {
        None => Ok(false),
        Some(v) if v.is_empty() => Ok(false),
        Some(v) => parse::go_bool(&v).map_err(|reason| InvalidFlag::new(name, v, reason)),
    }
}

/// DNS capture to the nameservers of resolv.conf, or to everything with `--capture-all-dns`.
/// Like istio-iptables, no nameserver means no DNS capture at all (with a warning).
fn dns_capture(host: &dyn Host, port: u16, all: bool) -> Result<Option<DnsCapture>, InvalidFlag> {
    if all {
        return Ok(Some(DnsCapture { port, servers: DnsServers::All }));
    }
    let (path, text) = host.resolv_conf();
    let text = text.map_err(|e| {
        InvalidFlag::new(
            "--redirect-dns",
            path.display().to_string(),
            format!(
                "cannot read the resolvers DNS capture is limited to ({e}); give --resolv-conf or --capture-all-dns"
            ),
        )
    })?;
    let servers = host::nameservers(&text);
    if servers.is_empty() {
        tracing::warn!(
            "--redirect-dns: {} lists no nameserver and --capture-all-dns is off: DNS is not captured",
            path.display()
        );
        return Ok(None);
    }
    Ok(Some(DnsCapture { port, servers: DnsServers::Only(servers) }))
}

/// istio-iptables limits an include list to 64 groups: they become one rule of `! --gid-owner`
/// matches, and iptables bounds the matches of a rule.
const MAX_OWNER_GROUPS: usize = 64;

fn owner_groups(host: &dyn Host, include: &str, exclude: &str) -> Result<OwnerGroups, InvalidFlag> {
    if include.trim() == "*" {
        let gids = parse::ids("--outbound-owner-groups-exclude", exclude, IdKind::Group, host)?;
        return Ok(OwnerGroups::AllExcept(gids));
    }
    let gids = parse::ids("--outbound-owner-groups", include, IdKind::Group, host)?;
    if gids.len() > MAX_OWNER_GROUPS {
        return Err(InvalidFlag::new(
            "--outbound-owner-groups",
            include,
            format!("at most {MAX_OWNER_GROUPS} groups, not {}", gids.len()),
        ));
    }
    Ok(OwnerGroups::Only(gids))
}

fn ipv4_loopback(s: &str) -> Result<Ipv4Net, InvalidFlag> {
    const FLAG: &str = "--outbound-ipv4-loopback-cidr";
    let net: Ipv4Net = s
        .trim()
        .parse()
        .map_err(|_| InvalidFlag::new(FLAG, s, "expected an IPv4 CIDR in 127.0.0.0/8 such as 127.0.0.1/32"))?;
    if !net.addr().is_loopback() || !(8..=32).contains(&net.prefix_len()) {
        return Err(InvalidFlag::new(FLAG, s, "expected a loopback CIDR with a prefix from /8 to /32"));
    }
    Ok(net.trunc())
}

#[cfg(test)]
mod tests;

//! The bootstrap: what the proxy is started with and keeps until it exits — where the admin API
//! and the readiness port listen, where discovery is, how long a drain and an idle TCP session may
//! last. Read once at start; an update that would change any of it is rejected as a whole
//! ([`Fixed`]), as Envoy's bootstrap needs a restart: applying the file's routing but not its
//! bootstrap would apply half a file.

use std::{
    fmt,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{invalid, Error};
use crate::parse::{self, format_duration, serialize_duration};

/// Where the admin API listens when the file does not say: loopback, Envoy's Prometheus port.
pub const DEFAULT_ADMIN_ADDRESS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, mesh_common::ports::ADMIN));
/// Envoy's `tcp_proxy` default idle timeout.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Envoy's HTTP connection manager default `stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Istio's default termination drain duration.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the discovery service is asked when `poll_interval` is absent.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Where the DNS proxy listens when `dns.addresses` is absent: where mesh-init's `--redirect-dns`
/// rules send the pod's queries (REDIRECT of a local packet goes to loopback), Istio's port.
pub const DEFAULT_DNS_ADDRESSES: [SocketAddr; 2] = [
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, mesh_common::ports::ISTIO_DNS)),
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::LOCALHOST, mesh_common::ports::ISTIO_DNS, 0, 0)),
];
/// The resolvers and search domains of the pod.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// The bootstrap fields of the file, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawBootstrap {
    pub admin: Option<RawAdmin>,
    /// A second port serving only `GET /ready`, for probes from outside the pod. No default:
    /// absent, there is no such port (see README.md).
    pub readiness: Option<RawReadiness>,
    pub discovery: Option<RawDiscovery>,
    /// The DNS proxy; absent, there is none (unless the command line asks for it).
    pub dns: Option<RawDns>,
    /// How long the drain lasts at most (Istio's `terminationDrainDuration`, default 5s).
    pub drain_timeout: Option<String>,
    /// How long the drain lasts at least before the process exits with no connection left
    /// (Istio's `MINIMUM_DRAIN_DURATION`; default: the whole `drain_timeout`).
    pub drain_minimum: Option<String>,
    /// A TCP session (routed, passthrough or inbound) with no bytes either way for this long is
    /// closed (default 1h, Envoy's).
    pub tcp_idle_timeout: Option<String>,
    /// An HTTP response with no bytes from the upstream for this long — its headers awaited with no
    /// route timeout, or its body — is ended (default 5 min, Envoy's `stream_idle_timeout`).
    pub stream_idle_timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
    /// Who may `POST /quitquitquit` and `POST /logging` (default `own_uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutations: Option<AdminMutations>,
}

/// Who may change the proxy through the admin API (`POST /quitquitquit`, `POST /logging`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminMutations {
    /// Only connections from a socket owned by the proxy's own user (the kernel's socket table
    /// says whose the peer socket is): the application, under another UID in the same pod,
    /// cannot stop or silence its sidecar. Istio lets any process in the pod.
    #[default]
    OwnUid,
    /// Anyone who can reach the admin address.
    Anyone,
}

impl AdminMutations {
    pub fn as_str(self) -> &'static str {
        match self {
            AdminMutations::OwnUid => "own_uid",
            AdminMutations::Anyone => "anyone",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReadiness {
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
    /// Who this proxy is to the server (`name.namespace`); default `$POD_NAME.$POD_NAMESPACE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    /// UDP and TCP, each (default `127.0.0.1:15053` and `[::1]:15053`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<String>>,
    /// Where the upstream resolvers and search domains are read from (default /etc/resolv.conf).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
}

/// The DNS proxy's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Dns {
    /// Each is bound for UDP and for TCP; an IPv6 one is skipped where the namespace has no IPv6.
    pub addresses: Vec<SocketAddr>,
    pub resolv_conf: PathBuf,
}

impl Default for Dns {
    fn default() -> Self {
        Dns { addresses: DEFAULT_DNS_ADDRESSES.to_vec(), resolv_conf: PathBuf::from(DEFAULT_RESOLV_CONF) }
    }
}

/// The bootstrap the proxy runs with: every value parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bootstrap {
    /// The admin API's address as configured (port 0 is bound to a free port; the bound address is
    /// in `app::Bound`).
    pub admin: SocketAddr,
    /// Who may use the admin API's `POST` endpoints.
    pub admin_mutations: AdminMutations,
    /// Where `GET /ready` alone is served (the kubelet's probe), if anywhere.
    pub readiness: Option<Readiness>,
    pub discovery: Option<Discovery>,
    pub dns: Option<Dns>,
    /// The longest drain: listeners accept, responses say `Connection: close`; then the process
    /// exits, closing what is left.
    #[serde(serialize_with = "serialize_duration")]
    pub drain_timeout: Duration,
    /// The shortest drain: from then on the process exits as soon as no connection is open.
    #[serde(serialize_with = "serialize_duration")]
    pub drain_minimum: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub tcp_idle_timeout: Duration,
    #[serde(serialize_with = "serialize_duration")]
    pub stream_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovery {
    pub url: String,
    /// Between polls of a server that does not hold requests (long poll), and after a failure.
    #[serde(serialize_with = "serialize_duration")]
    pub poll_interval: Duration,
    /// As written; when absent the environment's pod name is used (`control::discovery::node_name`).
    pub node: Option<String>,
}

/// An update that would change the bootstrap, which only a restart can.
#[derive(Debug, thiserror::Error)]
#[error("{field} cannot change while running ({running} → {wanted}); restart to change it")]
pub struct Fixed {
    pub field: &'static str,
    pub running: String,
    pub wanted: String,
}

impl RawBootstrap {
    /// Checks every value. The first problem wins, named by its field path.
    pub fn validate(&self) -> Result<Bootstrap, Error> {
        let admin = match &self.admin {
            Some(a) => socket_addr("admin.address", &a.address)?,
            None => DEFAULT_ADMIN_ADDRESS,
        };
        let readiness = match &self.readiness {
            None => None,
            Some(r) => {
                let address = socket_addr("readiness.address", &r.address)?;
                let same_ip =
                    address.ip() == admin.ip() || address.ip().is_unspecified() || admin.ip().is_unspecified();
                // Port 0 is a fresh port for each socket.
                if address.port() == admin.port() && address.port() != 0 && same_ip {
                    let reason =
                        format!("{address} overlaps admin.address {admin}; use its own port (Istio's is 15021)");
                    return Err(invalid("readiness.address", reason));
                }
                Some(Readiness { address })
            }
        };
        let drain_timeout = opt_duration("drain_timeout", self.drain_timeout.as_deref(), DEFAULT_DRAIN_TIMEOUT)?;
        // By default the whole period, as Istio's agent: peers keep sending to a pod until they
        // have all seen it go, and the application may still call out.
        let drain_minimum = opt_duration("drain_minimum", self.drain_minimum.as_deref(), drain_timeout)?;
        if drain_minimum > drain_timeout {
            let (m, t) = (format_duration(drain_minimum), format_duration(drain_timeout));
            return Err(invalid("drain_minimum", format!("{m} is longer than drain_timeout {t}")));
        }
        let tcp_idle_timeout =
            opt_duration("tcp_idle_timeout", self.tcp_idle_timeout.as_deref(), DEFAULT_TCP_IDLE_TIMEOUT)?;
        if tcp_idle_timeout.is_zero() {
            return Err(invalid("tcp_idle_timeout", "must be greater than 0"));
        }
        let stream_idle_timeout =
            opt_duration("stream_idle_timeout", self.stream_idle_timeout.as_deref(), DEFAULT_STREAM_IDLE_TIMEOUT)?;
        if stream_idle_timeout.is_zero() {
            return Err(invalid("stream_idle_timeout", "must be greater than 0"));
        }
        let discovery = match &self.discovery {
            None => None,
            Some(d) => {
                let url = d.url.trim_end_matches('/').to_string();
                if !url.starts_with("http://") {
                    return Err(invalid("discovery.url", format!("{:?}: only http:// URLs are supported", d.url)));
                }
                url.parse::<http::Uri>().map_err(|e| invalid("discovery.url", format!("{:?}: {e}", d.url)))?;
                let poll_interval =
                    opt_duration("discovery.poll_interval", d.poll_interval.as_deref(), DEFAULT_POLL_INTERVAL)?;
                if poll_interval < Duration::from_millis(10) {
                    return Err(invalid("discovery.poll_interval", "must be at least 10ms"));
                }
                if let Some(n) = &d.node {
                    if n.is_empty() || n.len() > 253 || !n.chars().all(|c| c.is_ascii_graphic()) {
                        return Err(invalid("discovery.node", format!("{n:?}: 1-253 printable characters, no spaces")));
                    }
                }
                Some(Discovery { url, poll_interval, node: d.node.clone() })
            }
        };
        let dns = match &self.dns {
            None => None,
            Some(d) => {
                let mut dns = Dns::default();
                if let Some(list) = &d.addresses {
                    if list.is_empty() {
                        return Err(invalid("dns.addresses", "at least one address (or leave it out for the default)"));
                    }
                    dns.addresses = list
                        .iter()
                        .enumerate()
                        .map(|(i, a)| socket_addr(&format!("dns.addresses[{i}]"), a))
                        .collect::<Result<_, _>>()?;
                }
                if let Some(p) = &d.resolv_conf {
                    dns.resolv_conf = PathBuf::from(p);
                }
                Some(dns)
            }
        };
        let admin_mutations = self.admin.as_ref().and_then(|a| a.mutations).unwrap_or_default();
        Ok(Bootstrap {
            admin,
            admin_mutations,
            readiness,
            discovery,
            dns,
            drain_timeout,
            drain_minimum,
            tcp_idle_timeout,
            stream_idle_timeout,
        })
    }
}

impl Bootstrap {
    /// Refuses `wanted` if it differs from the running bootstrap, naming the first field that does.
    pub fn check_unchanged(&self, wanted: &Bootstrap) -> Result<(), Fixed> {
        fn differs(field: &'static str, running: impl fmt::Display, wanted: impl fmt::Display) -> Result<(), Fixed> {
            Err(Fixed { field, running: running.to_string(), wanted: wanted.to_string() })
        }
        let readiness = |r: Option<Readiness>| r.map_or("none".to_string(), |r| r.address.to_string());
        let discovery = |d: &Option<Discovery>| d.as_ref().map_or("none".to_string(), |d| d.url.clone());
        if self.admin != wanted.admin {
            return differs("admin.address", self.admin, wanted.admin);
        }
        if self.admin_mutations != wanted.admin_mutations {
            return differs("admin.mutations", self.admin_mutations.as_str(), wanted.admin_mutations.as_str());
        }
        if self.readiness != wanted.readiness {
            return differs("readiness.address", readiness(self.readiness), readiness(wanted.readiness));
        }
        match (&self.discovery, &wanted.discovery) {
            (Some(r), Some(w)) if r.url == w.url && r.poll_interval != w.poll_interval => {
                return differs(
                    "discovery.poll_interval",
                    format_duration(r.poll_interval),
                    format_duration(w.poll_interval),
                );
            }
            (Some(r), Some(w)) if r.url == w.url && r.node != w.node => {
                let node = |n: &Option<String>| n.clone().unwrap_or_else(|| "none".into());
                return differs("discovery.node", node(&r.node), node(&w.node));
            }
            (r, w) if r != w => return differs("discovery.url", discovery(r), discovery(w)),
            _ => {}
        }
        if self.dns != wanted.dns {
            let show = |d: &Option<Dns>| {
                d.as_ref().map_or("none".to_string(), |d| format!("{:?} {}", d.addresses, d.resolv_conf.display()))
            };
            return differs("dns", show(&self.dns), show(&wanted.dns));
        }
        if self.drain_timeout != wanted.drain_timeout {
            return differs(
                "drain_timeout",
                format_duration(self.drain_timeout),
                format_duration(wanted.drain_timeout),
            );
        }
        if self.drain_minimum != wanted.drain_minimum {
            return differs(
                "drain_minimum",
                format_duration(self.drain_minimum),
                format_duration(wanted.drain_minimum),
            );
        }
        if self.tcp_idle_timeout != wanted.tcp_idle_timeout {
            let (r, w) = (format_duration(self.tcp_idle_timeout), format_duration(wanted.tcp_idle_timeout));
            return differs("tcp_idle_timeout", r, w);
        }
        if self.stream_idle_timeout != wanted.stream_idle_timeout {
            let (r, w) = (format_duration(self.stream_idle_timeout), format_duration(wanted.stream_idle_timeout));
            return differs("stream_idle_timeout", r, w);
        }
        Ok(())
    }
}

pub(super) fn socket_addr(field: &str, s: &str) -> Result<SocketAddr, Error> {
    parse::socket_addr(s).map_err(|e| invalid(field, e))
}

pub(super) fn opt_duration(field: &str, s: Option<&str>, default: Duration) -> Result<Duration, Error> {
    match s {
        None => Ok(default),
        Some(s) => parse::duration(s).map_err(|e| invalid(field, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(yaml: &str) -> Bootstrap {
        super::super::RawConfig::from_yaml("t", yaml).unwrap().split().0.validate().unwrap()
    }

    #[test]
    fn every_field_is_fixed_and_named() {
        let running = bootstrap("readiness: { address: 0.0.0.0:15021 }\ndiscovery: { url: http://a/m }\n");
        assert!(running.check_unchanged(&running.clone()).is_ok());
        let change = |yaml: &str| running.check_unchanged(&bootstrap(yaml)).unwrap_err().to_string();
        let base = "readiness: { address: 0.0.0.0:15021 }\ndiscovery: { url: http://a/m }\n";
        assert_eq!(
            change(&format!("admin: {{ address: 127.0.0.1:1 }}\n{base}")),
            "admin.address cannot change while running (127.0.0.1:15090 → 127.0.0.1:1); restart to change it"
        );
        assert_eq!(
            change("discovery: { url: http://a/m }\n"),
            "readiness.address cannot change while running (0.0.0.0:15021 → none); restart to change it"
        );
        assert_eq!(
            change("readiness: { address: 0.0.0.0:15021 }\n"),
            "discovery.url cannot change while running (http://a/m → none); restart to change it"
        );
        assert_eq!(
            change(&format!("{base}drain_timeout: 10s\n")),
            "drain_timeout cannot change while running (5s → 10s); restart to change it"
        );
        assert_eq!(
            change(&format!("{base}tcp_idle_timeout: 250ms\n")),
            "tcp_idle_timeout cannot change while running (3600s → 250ms); restart to change it"
        );
        let slower = base.replace("http://a/m }", "http://a/m, poll_interval: 2s }");
        assert_eq!(
            change(&slower),
            "discovery.poll_interval cannot change while running (1s → 2s); restart to change it"
        );
    }
}

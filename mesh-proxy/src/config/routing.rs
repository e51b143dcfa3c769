//! The routing: listeners, routes, clusters and endpoints (Envoy's LDS, RDS, CDS, EDS) and what
//! happens to traffic no route claims. This is what a file reload or a discovery answer replaces;
//! validated as a whole, against the running bootstrap, each time it changes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use ipnet::IpNet;

use super::{
    bootstrap::{opt_duration, socket_addr},
    invalid,
    policy::{self, *},
    Bootstrap, Error,
};
use crate::parse::{self, serialize_duration, Host};

/// mesh-init's (and istio-iptables') default `-t`: the mark of TPROXY'd connections.
pub const DEFAULT_TPROXY_MARK: u32 = 1337;
/// Envoy's default cluster connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The routing sections of the file (or of discovery answers), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRouting {
    pub outbound_policy: OutboundPolicy,
    pub listeners: Vec<RawListener>,
    pub routes: Vec<RawRoute>,
    pub clusters: Vec<RawCluster>,
    pub endpoints: Vec<RawEndpoints>,
    pub hosts: Vec<RawHostEntry>,
    pub inbound: Vec<RawInboundPort>,
}

/// A name the DNS proxy answers itself, with the virtual addresses the application should dial
/// (a service's ClusterIPs: the addresses the routes claim).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHostEntry {
    /// Fully qualified (`reviews.default.svc.cluster.local`); shorter forms are answered through
    /// the search domains of the proxy's resolv.conf.
    pub name: String,
    pub addresses: Vec<String>,
}

/// What happens to outbound traffic that no route claims (Istio's `outboundTrafficPolicy`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboundPolicy {
    /// Forward it to the destination the application dialled (Istio's PassthroughCluster).
    #[default]
    AllowAny,
    /// Refuse it: TCP is closed, HTTP gets a 502 (Istio's BlackHoleCluster).
    RegistryOnly,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: String,
    pub address: String,
    /// `IP_TRANSPARENT`: accepts the connections mesh-init's TPROXY rules (`-m TPROXY`) deliver,
    /// and hands inbound ones to the application from the client's own address. Needs
    /// `CAP_NET_ADMIN`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transparent: bool,
    /// The mark of those hand-offs, which mesh-init's rules route back to the proxy: its `-t`
    /// (default 1337). Only with `transparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tproxy_mark: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub destinations: Vec<String>,
    #[serde(default)]
    pub protocol: Protocol,
    pub rules: Vec<RawRule>,
}

/// How a route's traffic is understood.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1 or HTTP/2 (prior knowledge, told apart by the first bytes): a cluster is picked
    /// for every request, and for every HTTP/2 stream.
    Http,
    /// Opaque bytes: a cluster is picked once per connection.
    Tcp,
    /// Peek at the first bytes: HTTP/1 if they look like a request line, HTTP/2 if they are its
    /// connection preface, TCP otherwise.
    #[default]
    Auto,
}

/// One rule of a route (Istio's `HTTPRoute` / `TCPRoute`): conditions, then exactly one action
/// (`clusters`, `redirect` or `direct_response`) and the policies that apply on the way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// Shown in `/config_dump` and access logs (Istio's `HTTPRoute.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// One match block, or a list of blocks any of which may match; none matches every request.
    #[serde(
        default,
        rename = "match",
        deserialize_with = "policy::one_or_many",
        serialize_with = "policy::serialize_one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub matcher: Vec<RawMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<RawWeightedCluster>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<RawRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<RawDirectResponse>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<RawRewrite>,
    /// Header operations for every request of the rule (after the destination's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<RawHeaders>,
    /// Longest wait for the response headers, retries included; none by default (Istio's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RawRetries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<RawFault>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<RawMirror>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimit>,
}

/// Conditions that must all hold (Istio's `HTTPMatchRequest`, plus `L4MatchAttributes`' port and
/// subnets for TCP).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// RE2 syntax, matching the whole path (without the query string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    /// `path` and `path_prefix` compare ASCII case-insensitively (not `path_regex`, as in Istio).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<RawStringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<RawStringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RawStringMatch>,
    /// Per header name: a value (exact), or `{exact|prefix|regex: ...}`, or `{}` (present).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, RawStringMatch>,
    /// Per header name: the request must not have it (`{}`) or not with such a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, RawStringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, RawStringMatch>,
    /// The destination port the application dialled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The original destination address is in one of these (CIDR); TCP and HTTP alike.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedCluster {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Header operations for requests sent to this cluster (before the rule's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<RawHeaders>,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: String,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// Replaces `lb_policy` (which must then be left at `round_robin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<RawConsistentHash>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// The HTTP version spoken to its endpoints (Envoy's `http_protocol_options`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: UpstreamProtocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<RawTcpKeepalive>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<RawCircuitBreakers>,
    /// An upstream connection is closed after this many requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    /// An idle pooled upstream connection is closed after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<RawOutlierDetection>,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The HTTP version a cluster's endpoints are spoken to in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 on a keep-alive pool per endpoint.
    #[default]
    Http1,
    /// HTTP/2 (cleartext, prior knowledge) on one multiplexed connection per endpoint.
    Http2,
    /// As the downstream spoke: HTTP/2 requests go upstream as HTTP/2, HTTP/1 ones as HTTP/1.1
    /// (Envoy's `USE_DOWNSTREAM_PROTOCOL`).
    Auto,
}

/// How a cluster spreads requests over its endpoints.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two choices: the less busy of two random endpoints.
    LeastRequest,
    Random,
    /// To the original destination the application dialled (Envoy's `ORIGINAL_DST`); no endpoints.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEndpoints {
    pub cluster: String,
    pub addresses: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated
// ---------------------------------------------------------------------------------------------

/// The routing the proxy runs: every reference resolved, every value parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Routing {
    pub outbound_policy: OutboundPolicy,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    /// Each cluster carries its endpoints (the `endpoints` section merged in).
    pub clusters: Vec<Cluster>,
    /// Names the DNS proxy answers itself.
    pub hosts: Vec<HostEntry>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inbound: Vec<InboundPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostEntry {
    /// Lower case, without a trailing dot.
    pub name: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// The TPROXY mark when the listener is transparent.
    pub transparent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Route {
    pub name: String,
    pub destinations: Vec<Destination>,
    pub protocol: Protocol,
    pub rules: Vec<Rule>,
}

/// What the application dialled, as a route names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum Destination {
    /// An original destination `ip:port` (also matched by an HTTP authority that is that literal).
    Addr(SocketAddr),
    /// An HTTP authority: host (lower case) and port; no port matches every port.
    Host { host: String, port: Option<u16> },
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Addr(a) => write!(f, "{a}"),
            Destination::Host { host, port: Some(p) } => write!(f, "{host}:{p}"),
            Destination::Host { host, port: None } => write!(f, "{host}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any of them; none matches every request.
    #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<Match>,
    /// Exactly one of `clusters`, `redirect` and `direct_response` is given.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<WeightedCluster>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect: Option<Redirect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<DirectResponse>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<Rewrite>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
    /// None: no timeout (Istio's default).
    #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<Mirror>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// Conditions that must all hold; the default matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub path: PathMatch,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// Lower-case header names with their condition.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, StringMatch)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub without_headers: Vec<(String, StringMatch)>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<(String, StringMatch)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<IpNet>,
}

impl Match {
    /// Whether a TCP connection can be judged by it: no condition but port and subnets.
    pub fn is_l4(&self) -> bool {
        let Match {
            path, ignore_uri_case: _, authority, method, scheme, headers, without_headers, query_params, ..
        } = self;
        *path == PathMatch::Any
            && authority.is_none()
            && method.is_none()
            && scheme.is_none()
            && headers.is_empty()
            && without_headers.is_empty()
            && query_params.is_empty()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    #[default]
    Any,
    Prefix(String),
    Exact(String),
    Regex(Pattern),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub lb_policy: LbPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consistent_hash: Option<ConsistentHash>,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_keepalive: Option<TcpKeepalive>,
    pub circuit_breakers: CircuitBreakers,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests_per_connection: Option<u32>,
    #[serde(serialize_with = "serialize_opt_duration", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    pub endpoints: Vec<SocketAddr>,
}

impl RawRouting {
    /// Checks every value and reference; `bootstrap` is what the listeners may not collide with.
    /// The first problem wins, named by its field path.
    pub fn validate(&self, bootstrap: &Bootstrap) -> Result<Routing, Error> {
        let mut listeners = Vec::with_capacity(self.listeners.len());
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            check_name(&format!("{field}.name"), &l.name)?;
            if !names.insert(l.name.as_str()) {
                return Err(invalid(format!("{field}.name"), format!("listener {:?} is defined twice", l.name)));
            }
            let address = socket_addr(&format!("{field}.address"), &l.address)?;
            if !addrs.insert(address) {
                return Err(invalid(format!("{field}.address"), format!("{address} is used by two listeners")));
            }
            // Port 0 is a fresh port for each socket (tests start whole proxies that way).
            let fixed = address.port() != 0;
            if fixed && address == bootstrap.admin {
                return Err(invalid(format!("{field}.address"), format!("{address} is the admin address")));
            }
            if fixed && bootstrap.readiness.is_some_and(|r| r.address == address) {
                return Err(invalid(format!("{field}.address"), format!("{address} is the readiness address")));
            }
            let transparent = match (l.transparent, l.tproxy_mark) {
                (true, Some(0)) => return Err(invalid(format!("{field}.tproxy_mark"), "must not be 0")),
                (true, mark) => Some(mark.unwrap_or(DEFAULT_TPROXY_MARK)),
                (false, Some(_)) => {
                    return Err(invalid(format!("{field}.tproxy_mark"), "only a transparent listener has one"))
                }
                (false, None) => None,
            };
            listeners.push(Listener { name: l.name.clone(), address, transparent });
        }

        let mut clusters: Vec<Cluster> = Vec::with_capacity(self.clusters.len());
        let mut cluster_index: HashMap<&str, usize> = HashMap::new();
        for (i, c) in self.clusters.iter().enumerate() {
            let field = format!("clusters[{i}]");
            check_name(&format!("{field}.name"), &c.name)?;
            if cluster_index.insert(c.name.as_str(), i).is_some() {
                return Err(invalid(format!("{field}.name"), format!("cluster {:?} is defined twice", c.name)));
            }
            let connect_timeout = opt_duration(
                &format!("{field}.connect_timeout"),
                c.connect_timeout.as_deref(),
                DEFAULT_CONNECT_TIMEOUT,
            )?;
            if connect_timeout.is_zero() {
                return Err(invalid(format!("{field}.connect_timeout"), "must be greater than 0"));
            }
            clusters.push(validate_cluster(&field, c, connect_timeout)?);
        }

        let mut seen_eds = HashSet::new();
        // Linear in the endpoints: a `contains` on each cluster's list was quadratic in its size.
        let mut seen_addrs = HashSet::new();
        for (i, e) in self.endpoints.iter().enumerate() {
            let field = format!("endpoints[{i}]");
            let Some(&ci) = cluster_index.get(e.cluster.as_str()) else {
                return Err(invalid(
                    format!("{field}.cluster"),
                    format!("cluster {:?} is not defined in clusters", e.cluster),
                ));
            };
            if !seen_eds.insert(e.cluster.as_str()) {
                return Err(invalid(
                    format!("{field}.cluster"),
                    format!(
                        "endpoints for cluster {:?} are given twice; list all its addresses in one entry",
                        e.cluster
                    ),
                ));
            }
            if clusters[ci].lb_policy == LbPolicy::Passthrough && !e.addresses.is_empty() {
                return Err(invalid(
                    format!("{field}.addresses"),
                    format!("cluster {:?} is a passthrough cluster: it has no endpoints", e.cluster),
                ));
            }
            for (j, a) in e.addresses.iter().enumerate() {
                // The field's name is made only for an error: 100,000 addresses are common.
                let addr = parse::socket_addr(a).map_err(|e| invalid(format!("{field}.addresses[{j}]"), e))?;
                if !seen_addrs.insert((ci, addr)) {
                    return Err(invalid(format!("{field}.addresses[{j}]"), format!("{addr} is listed twice")));
                }
                clusters[ci].endpoints.push(addr);
            }
        }

        let mut routes = Vec::with_capacity(self.routes.len());
        let mut route_names = HashSet::new();
        let mut claimed: HashMap<Destination, &str> = HashMap::new();
        for (i, r) in self.routes.iter().enumerate() {
            let field = format!("routes[{i}]");
            check_name(&format!("{field}.name"), &r.name)?;
            if !route_names.insert(r.name.as_str()) {
                return Err(invalid(format!("{field}.name"), format!("route {:?} is defined twice", r.name)));
            }
            if r.destinations.is_empty() {
                return Err(invalid(format!("{field}.destinations"), "at least one destination is needed"));
            }
            let mut destinations = Vec::with_capacity(r.destinations.len());
            for (j, d) in r.destinations.iter().enumerate() {
                let dest = parse_destination(d).map_err(|e| invalid(format!("{field}.destinations[{j}]"), e))?;
                if let Some(other) = claimed.insert(dest.clone(), r.name.as_str()) {
                    return Err(invalid(
                        format!("{field}.destinations[{j}]"),
                        format!("{dest} is already routed by route {other:?}"),
                    ));
                }
                destinations.push(dest);
            }
            if r.rules.is_empty() {
                return Err(invalid(format!("{field}.rules"), "at least one rule is needed"));
            }
            let mut rules = Vec::with_capacity(r.rules.len());
            for (k, rule) in r.rules.iter().enumerate() {
                let field = format!("{field}.rules[{k}]");
                let rule = validate_rule(&field, rule, &cluster_index)?;
                if r.protocol == Protocol::Tcp && rule.clusters.is_empty() {
                    return Err(invalid(
                        field,
                        "a tcp route's rules forward to clusters (redirect and direct_response are HTTP's)",
                    ));
                }
                rules.push(rule);
            }
            routes.push(Route { name: r.name.clone(), destinations, protocol: r.protocol, rules });
        }

        let mut hosts = Vec::with_capacity(self.hosts.len());
        let mut host_names = HashSet::new();
        for (i, h) in self.hosts.iter().enumerate() {
            let field = format!("hosts[{i}]");
            let name = dns_name(&format!("{field}.name"), &h.name)?;
            if !host_names.insert(name.clone()) {
                return Err(invalid(format!("{field}.name"), format!("{name:?} is listed twice")));
            }
            if h.addresses.is_empty() {
                return Err(invalid(format!("{field}.addresses"), "at least one address"));
            }
            let mut addresses = Vec::with_capacity(h.addresses.len());
            for (j, a) in h.addresses.iter().enumerate() {
                let ip = a.parse::<IpAddr>().map_err(|_| {
                    invalid(format!("{field}.addresses[{j}]"), format!("{a:?} is not an IPv4 or IPv6 address"))
                })?;
                addresses.push(ip);
            }
            hosts.push(HostEntry { name, addresses });
        }

        let inbound = policy::inbound_ports("inbound", &self.inbound)?;
        if !inbound.is_empty() {
            return Err(invalid("inbound", "not applied by this build of mesh-proxy yet"));
        }
        Ok(Routing { outbound_policy: self.outbound_policy, listeners, routes, clusters, hosts, inbound })
    }
}

/// Parses a route destination: an `ip:port`, or an HTTP authority `host[:port]` (lower-cased; no
/// port matches every port), by the grammar the request path reads authorities with.
pub fn parse_destination(s: &str) -> Result<Destination, String> {
    let s = s.trim();
    let a = parse::authority(s).map_err(|e| match e {
        parse::AuthorityError::Port => format!("invalid port in {s:?}"),
        e => format!("invalid destination {s:?}: {e}"),
    })?;
    match (a.host, a.port) {
        (Host::Ip(ip), Some(port)) => Ok(Destination::Addr(SocketAddr::new(ip, port))),
        (Host::Ip(_), None) => Err(format!("invalid destination {s:?}: an IP destination needs a port")),
        (Host::Name(host), port) => Ok(Destination::Host { host: host.to_ascii_lowercase(), port }),
    }
}

fn validate_cluster(field: &str, c: &RawCluster, connect_timeout: Duration) -> Result<Cluster, Error> {
    let consistent_hash = c
        .consistent_hash
        .as_ref()
        .map(|h| policy::consistent_hash(&format!("{field}.consistent_hash"), h))
        .transpose()?;
    if consistent_hash.is_some() && c.lb_policy != LbPolicy::RoundRobin {
        return Err(invalid(field, "give either lb_policy or consistent_hash, not both"));
    }
    let idle_timeout = match c.idle_timeout.as_deref() {
        None => None,
        Some(s) => {
            let d = opt_duration(&format!("{field}.idle_timeout"), Some(s), Duration::ZERO)?;
            if d.is_zero() {
                return Err(invalid(format!("{field}.idle_timeout"), "must be greater than 0"));
            }
            Some(d)
        }
    };
    if c.max_requests_per_connection == Some(0) {
        return Err(invalid(
            format!("{field}.max_requests_per_connection"),
            "must be greater than 0 (leave it out for no limit)",
        ));
    }
    Ok(Cluster {
        name: c.name.clone(),
        lb_policy: c.lb_policy,
        consistent_hash,
        connect_timeout,
        protocol: c.protocol,
        tcp_keepalive: c
            .tcp_keepalive
            .as_ref()
            .map(|k| policy::tcp_keepalive(&format!("{field}.tcp_keepalive"), k))
            .transpose()?,
        circuit_breakers: match &c.circuit_breakers {
            Some(cb) => policy::circuit_breakers(&format!("{field}.circuit_breakers"), cb)?,
            None => CircuitBreakers::default(),
        },
        max_requests_per_connection: c.max_requests_per_connection,
        idle_timeout,
        outlier_detection: c
            .outlier_detection
            .as_ref()
            .map(|o| policy::outlier_detection(&format!("{field}.outlier_detection"), o))
            .transpose()?,
        endpoints: Vec::new(),
    })
    .and_then(|c| {
        not_applied_yet(
            field,
            &[
                // Retries in flight are counted by the route side's retries.
                ("circuit_breakers.max_retries", c.circuit_breakers.max_retries.is_some()),
                (
                    "circuit_breakers.retry_budget",
                    c.circuit_breakers.retry_budget_percent != CircuitBreakers::default().retry_budget_percent
                        || c.circuit_breakers.min_retry_concurrency != CircuitBreakers::default().min_retry_concurrency,
                ),
            ],
        )?;
        Ok(c)
    })
}

fn validate_match(field: &str, m: &RawMatch) -> Result<Match, Error> {
    let path = match (&m.path_prefix, &m.path, &m.path_regex) {
        (None, None, None) => PathMatch::Any,
        (Some(p), None, None) => PathMatch::Prefix(check_path(&format!("{field}.path_prefix"), p)?),
        (None, Some(p), None) => PathMatch::Exact(check_path(&format!("{field}.path"), p)?),
        (None, None, Some(r)) => match policy::string_match(
            &format!("{field}.path_regex"),
            &RawStringMatch { regex: Some(r.clone()), ..Default::default() },
        )? {
            StringMatch::Regex(p) => PathMatch::Regex(p),
            _ => unreachable!("a regex string match is a regex"),
        },
        _ => return Err(invalid(field, "give one of path_prefix, path or path_regex")),
    };
    let one = |name: &str, v: &Option<RawStringMatch>| {
        v.as_ref().map(|v| policy::string_match(&format!("{field}.{name}"), v)).transpose()
    };
    if m.port == Some(0) {
        return Err(invalid(format!("{field}.port"), "must be 1 to 65535"));
    }
    Ok(Match {
        path,
        ignore_uri_case: m.ignore_uri_case,
        authority: one("authority", &m.authority)?,
        method: one("method", &m.method)?,
        scheme: one("scheme", &m.scheme)?,
        headers: policy::header_matches(&format!("{field}.headers"), &m.headers)?,
        without_headers: policy::header_matches(&format!("{field}.without_headers"), &m.without_headers)?,
        query_params: policy::query_matches(&format!("{field}.query_params"), &m.query_params)?,
        port: m.port,
        destination_subnets: policy::subnets(&format!("{field}.destination_subnets"), &m.destination_subnets)?,
    })
}

fn validate_rule(field: &str, rule: &RawRule, clusters: &HashMap<&str, usize>) -> Result<Rule, Error> {
    if let Some(n) = &rule.name {
        check_name(&format!("{field}.name"), n)?;
    }
    let matches = match rule.matcher.as_slice() {
        [one] => vec![validate_match(&format!("{field}.match"), one)?],
        many => many
            .iter()
            .enumerate()
            .map(|(i, m)| validate_match(&format!("{field}.match[{i}]"), m))
            .collect::<Result<_, _>>()?,
    };
    let actions = usize::from(!rule.clusters.is_empty())
        + usize::from(rule.redirect.is_some())
        + usize::from(rule.direct_response.is_some());
    if actions != 1 {
        return Err(invalid(field, "give exactly one of clusters, redirect or direct_response"));
    }
    let defined = |f: String, name: &str| -> Result<(), Error> {
        if clusters.contains_key(name) {
            Ok(())
        } else {
            Err(invalid(f, format!("cluster {name:?} is not defined in clusters")))
        }
    };
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(rule.clusters.len());
    for (i, wc) in rule.clusters.iter().enumerate() {
        defined(format!("{field}.clusters[{i}].name"), &wc.name)?;
        if wc.weight == 0 {
            return Err(invalid(format!("{field}.clusters[{i}].weight"), "weight must be greater than 0"));
        }
        total += u64::from(wc.weight);
        let headers =
            wc.headers.as_ref().map(|h| policy::headers(&format!("{field}.clusters[{i}].headers"), h)).transpose()?;
        out.push(WeightedCluster { name: wc.name.clone(), weight: wc.weight, headers });
    }
    if total > u64::from(u32::MAX) {
        return Err(invalid(format!("{field}.clusters"), "the weights add up to more than 4294967295"));
    }
    // Istio's `0s` is "no timeout", like leaving it out.
    let timeout = opt_duration(&format!("{field}.timeout"), rule.timeout.as_deref(), Duration::ZERO)?;
    let timeout = (!timeout.is_zero()).then_some(timeout);
    let mut mirrors = Vec::with_capacity(rule.mirrors.len());
    for (i, m) in rule.mirrors.iter().enumerate() {
        defined(format!("{field}.mirrors[{i}].cluster"), &m.cluster)?;
        mirrors.push(policy::mirror(&format!("{field}.mirrors[{i}]"), m)?);
    }
    let validated = Rule {
        name: rule.name.clone(),
        matches,
        clusters: out,
        redirect: rule.redirect.as_ref().map(|r| policy::redirect(&format!("{field}.redirect"), r)).transpose()?,
        direct_response: rule
            .direct_response
            .as_ref()
            .map(|d| policy::direct_response(&format!("{field}.direct_response"), d))
            .transpose()?,
        rewrite: rule.rewrite.as_ref().map(|r| policy::rewrite(&format!("{field}.rewrite"), r)).transpose()?,
        headers: rule.headers.as_ref().map(|h| policy::headers(&format!("{field}.headers"), h)).transpose()?,
        timeout,
        retries: rule.retries.as_ref().map(|r| policy::retries(&format!("{field}.retries"), r)).transpose()?,
        fault: rule.fault.as_ref().map(|f| policy::fault(&format!("{field}.fault"), f)).transpose()?,
        mirrors,
        rate_limit: rule
            .rate_limit
            .as_ref()
            .map(|r| policy::rate_limit(&format!("{field}.rate_limit"), r))
            .transpose()?,
    };
    not_applied_yet(
        field,
        &[
            ("redirect", validated.redirect.is_some()),
            ("direct_response", validated.direct_response.is_some()),
            ("rewrite", validated.rewrite.is_some()),
            ("headers", validated.headers.is_some() || validated.clusters.iter().any(|c| c.headers.is_some())),
            ("mirrors", !validated.mirrors.is_empty()),
            ("rate_limit", validated.rate_limit.is_some()),
        ],
    )?;
    Ok(validated)
}

/// The schema lands before the data path that applies it: a policy this build does not apply yet
/// is refused, never accepted and ignored. Each part of the data path removes its line here.
fn not_applied_yet(field: &str, given: &[(&str, bool)]) -> Result<(), Error> {
    match given.iter().find(|(_, g)| *g) {
        Some((name, _)) => Err(invalid(format!("{field}.{name}"), "not applied by this build of mesh-proxy yet")),
        None => Ok(()),
    }
}

fn check_path(field: &str, p: &str) -> Result<String, Error> {
    if !p.starts_with('/') {
        return Err(invalid(field, format!("{p:?} must start with /")));
    }
    Ok(p.to_string())
}

/// A DNS name as the `hosts` section takes it: letters, digits, `-` and `_` in dot-separated labels
/// of 1-63 characters, 253 in all; returned lower-cased without a trailing dot.
fn dns_name(field: &str, name: &str) -> Result<String, Error> {
    let bad = || invalid(field, format!("{name:?} is not a DNS name (labels of letters, digits, '-', '_')"));
    let n = name.strip_suffix('.').unwrap_or(name);
    let ok = matches!(parse::authority(n), Ok(parse::Authority { host: Host::Name(_), port: None }))
        && n.split('.').all(|l| !l.is_empty() && l.len() <= 63);
    if !ok {
        return Err(bad());
    }
    Ok(n.to_ascii_lowercase())
}

fn check_name(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == '"') {
        return Err(invalid(field, format!("{name:?} is not a valid name: 1-128 printable characters")));
    }
    Ok(())
}

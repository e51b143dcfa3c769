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

use super::{
    bootstrap::{opt_duration, socket_addr},
    invalid, Bootstrap, Error,
};
use crate::parse::{self, serialize_duration, Host};

/// Envoy's default cluster connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default route timeout: the longest wait for an upstream's response headers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// The routing sections of the file (or of discovery answers), as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawRouting {
    pub outbound_policy: OutboundPolicy,
    pub listeners: Vec<RawListener>,
    pub routes: Vec<RawRoute>,
    pub clusters: Vec<RawCluster>,
    pub endpoints: Vec<RawEndpoints>,
    pub hosts: Vec<RawHostEntry>,
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matcher: Option<RawMatch>,
    pub clusters: Vec<RawWeightedCluster>,
    /// Longest wait for the response headers (default 15s, Envoy's route timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Exact value per header name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedCluster {
    pub name: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub name: String,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    /// The HTTP version spoken to its endpoints (Envoy's `http_protocol_options`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: UpstreamProtocol,
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
    #[serde(rename = "match")]
    pub matcher: Match,
    pub clusters: Vec<WeightedCluster>,
    #[serde(serialize_with = "serialize_duration")]
    pub timeout: Duration,
}

/// Conditions that must all hold; the default matches every request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Match {
    pub path: PathMatch,
    /// Lower-case header names with the exact value required.
    pub headers: Vec<(String, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PathMatch {
    #[default]
    Any,
    Prefix(String),
    Exact(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    pub name: String,
    pub lb_policy: LbPolicy,
    #[serde(serialize_with = "serialize_duration")]
    pub connect_timeout: Duration,
    pub protocol: UpstreamProtocol,
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
            listeners.push(Listener { name: l.name.clone(), address });
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
            clusters.push(Cluster {
                name: c.name.clone(),
                lb_policy: c.lb_policy,
                connect_timeout,
                protocol: c.protocol,
                endpoints: Vec::new(),
            });
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
                rules.push(validate_rule(&field, rule, &cluster_index)?);
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

        Ok(Routing { outbound_policy: self.outbound_policy, listeners, routes, clusters, hosts })
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

fn validate_rule(field: &str, rule: &RawRule, clusters: &HashMap<&str, usize>) -> Result<Rule, Error> {
    let mut matcher = Match::default();
    if let Some(m) = &rule.matcher {
        matcher.path = match (&m.path_prefix, &m.path) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!("{field}.match"), "give either path_prefix or path, not both"))
            }
            (Some(p), None) => PathMatch::Prefix(check_path(&format!("{field}.match.path_prefix"), p)?),
            (None, Some(p)) => PathMatch::Exact(check_path(&format!("{field}.match.path"), p)?),
            (None, None) => PathMatch::Any,
        };
        for (name, value) in &m.headers {
            let hfield = format!("{field}.match.headers.{name}");
            let lname = name.to_ascii_lowercase();
            http::HeaderName::from_bytes(lname.as_bytes())
                .map_err(|_| invalid(&hfield, format!("{name:?} is not a valid header name")))?;
            http::HeaderValue::from_str(value)
                .map_err(|_| invalid(&hfield, format!("{value:?} is not a valid header value")))?;
            matcher.headers.push((lname, value.clone()));
        }
    }
    if rule.clusters.is_empty() {
        return Err(invalid(format!("{field}.clusters"), "at least one cluster is needed"));
    }
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(rule.clusters.len());
    for (i, wc) in rule.clusters.iter().enumerate() {
        if !clusters.contains_key(wc.name.as_str()) {
            return Err(invalid(
                format!("{field}.clusters[{i}].name"),
                format!("cluster {:?} is not defined in clusters", wc.name),
            ));
        }
        if wc.weight == 0 {
            return Err(invalid(format!("{field}.clusters[{i}].weight"), "weight must be greater than 0"));
        }
        total += u64::from(wc.weight);
        out.push(WeightedCluster { name: wc.name.clone(), weight: wc.weight });
    }
    if total > u64::from(u32::MAX) {
        return Err(invalid(format!("{field}.clusters"), "the weights add up to more than 4294967295"));
    }
    let timeout = opt_duration(&format!("{field}.timeout"), rule.timeout.as_deref(), DEFAULT_REQUEST_TIMEOUT)?;
    Ok(Rule { matcher, clusters: out, timeout })
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

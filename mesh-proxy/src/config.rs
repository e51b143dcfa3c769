//! The configuration: what the operator writes (YAML or JSON) and the validated form the proxy runs.
//!
//! Input types (`Raw*`) mirror the file one to one and reject unknown fields, so a typo is an
//! error naming the field and its line instead of a silently ignored setting. [`RawConfig::validate`]
//! turns them into [`Config`], where every reference has been checked and every string parsed;
//! nothing past this module sees a string address or duration. Discovery answers carry the same
//! `Raw*` objects, so both sources go through the same checks.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the admin API listens when the file does not say.
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:15090";
/// Envoy's default cluster connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Envoy's default route timeout: the longest wait for an upstream's response headers.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Envoy's `tcp_proxy` default idle timeout.
pub const DEFAULT_TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Istio's default termination drain duration.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the discovery service is asked when `poll_interval` is absent.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// A configuration that could not be read, parsed or accepted. Never applied.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    /// serde_yaml's message names the field path, the offending key and its line and column.
    #[error("{origin}: {error}")]
    Yaml { origin: String, error: serde_yaml::Error },
    /// serde_json's message carries the line and column.
    #[error("{origin}: {error}")]
    Json { origin: String, error: serde_json::Error },
    /// Parsed, but a value is wrong; `field` is the path to it, e.g. `routes[0].rules[1].clusters[0].name`.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl fmt::Display) -> Error {
    Error::Invalid { field: field.into(), reason: reason.to_string() }
}

// ---------------------------------------------------------------------------------------------
// Input
// ---------------------------------------------------------------------------------------------

/// The file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RawAdmin>,
    /// A second port serving only `GET /ready`, for probes from outside the pod. No default:
    /// absent, there is no such port (see README.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<RawReadiness>,
    #[serde(default)]
    pub outbound_policy: OutboundPolicy,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub clusters: Vec<RawCluster>,
    #[serde(default)]
    pub endpoints: Vec<RawEndpoints>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<RawDiscovery>,
    /// How long SIGTERM waits for in-flight requests and connections (default 5s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout: Option<String>,
    /// A TCP session (routed, passthrough or inbound) with no bytes either way for this long is
    /// closed (default 1h, Envoy's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawReadiness {
    pub address: String,
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
    /// HTTP/1.1: a cluster is picked for every request.
    Http,
    /// Opaque bytes: a cluster is picked once per connection.
    Tcp,
    /// Peek at the first bytes: HTTP/1 if they look like a request line, TCP otherwise.
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

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_interval: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validated
// ---------------------------------------------------------------------------------------------

/// The configuration the proxy runs: every reference resolved, every value parsed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    pub admin: SocketAddr,
    /// Where `GET /ready` alone is served (the kubelet's probe), if anywhere.
    pub readiness: Option<Readiness>,
    pub outbound_policy: OutboundPolicy,
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    /// Each cluster carries its endpoints (the file's `endpoints` section merged in).
    pub clusters: Vec<Cluster>,
    pub discovery: Option<Discovery>,
    #[serde(serialize_with = "ser_duration")]
    pub drain_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub tcp_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Readiness {
    pub address: SocketAddr,
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
    #[serde(serialize_with = "ser_duration")]
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
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    pub endpoints: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discovery {
    pub url: String,
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

/// Renders a duration the way the file writes it (`250ms`, `5s`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses `250ms`, `1s`, `1.5s`, `2m`, `1h`. A bare number is refused: the unit is never guessed.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let expected = "expected a number followed by ms, s, m or h, e.g. 250ms or 1s";
    let value: f64 = num.parse().map_err(|_| format!("invalid duration {s:?}: {expected}"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("invalid duration {s:?}: {expected}")),
    };
    if !secs.is_finite() || secs > 365.0 * 86400.0 {
        return Err(format!("invalid duration {s:?}: too long"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `ip:port` (IPv6 as `[addr]:port`).
fn parse_socket_addr(field: &str, s: &str) -> Result<SocketAddr, Error> {
    s.trim().parse().map_err(|_| {
        invalid(field, format!("invalid address {s:?}: expected ip:port, e.g. 10.0.0.1:8080 or [fd00::1]:8080"))
    })
}

/// Parses a route destination: an `ip:port`, or an HTTP authority `host[:port]`.
pub fn parse_destination(s: &str) -> Result<Destination, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(Destination::Addr(addr));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            let port = p.parse::<u16>().map_err(|_| format!("invalid port in {s:?}"))?;
            (h, Some(port))
        }
        Some(_) => return Err(format!("invalid destination {s:?}: write IPv6 as [addr]:port")),
        None => (s, None),
    };
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if !valid {
        return Err(format!("invalid destination {s:?}: expected host[:port] or ip:port"));
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Err(format!("invalid destination {s:?}: an IP destination needs a port"));
    }
    Ok(Destination::Host { host: host.to_ascii_lowercase(), port })
}

impl RawConfig {
    /// Parses YAML (which also reads JSON). `origin` names the source in errors (a path or URL).
    pub fn from_yaml(origin: &str, text: &str) -> Result<Self, Error> {
        if text.trim().is_empty() {
            return Ok(RawConfig::default());
        }
        serde_yaml::from_str(text).map_err(|error| Error::Yaml { origin: origin.to_string(), error })
    }

    /// Reads and parses a file; the file name is the origin in errors.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|error| Error::Read { path: path.display().to_string(), error })?;
        Self::from_yaml(&path.display().to_string(), &text)
    }

    /// Checks every value and reference. The first problem wins, named by its field path.
    pub fn validate(&self) -> Result<Config, Error> {
        let admin = match &self.admin {
            Some(a) => parse_socket_addr("admin.address", &a.address)?,
            None => DEFAULT_ADMIN_ADDRESS.parse().expect("default admin address parses"),
        };
        let readiness = match &self.readiness {
            None => None,
            Some(r) => {
                let address = parse_socket_addr("readiness.address", &r.address)?;
                let same_ip =
                    address.ip() == admin.ip() || address.ip().is_unspecified() || admin.ip().is_unspecified();
                if address.port() == admin.port() && same_ip {
                    let reason =
                        format!("{address} overlaps admin.address {admin}; use its own port (Istio's is 15021)");
                    return Err(invalid("readiness.address", reason));
                }
                Some(Readiness { address })
            }
        };
        let drain_timeout = opt_duration("drain_timeout", self.drain_timeout.as_deref(), DEFAULT_DRAIN_TIMEOUT)?;
        let tcp_idle_timeout =
            opt_duration("tcp_idle_timeout", self.tcp_idle_timeout.as_deref(), DEFAULT_TCP_IDLE_TIMEOUT)?;
        if tcp_idle_timeout.is_zero() {
            return Err(invalid("tcp_idle_timeout", "must be greater than 0"));
        }

        let mut listeners = Vec::with_capacity(self.listeners.len());
        let mut names = HashSet::new();
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let field = format!("listeners[{i}]");
            check_name(&format!("{field}.name"), &l.name)?;
            if !names.insert(l.name.as_str()) {
                return Err(invalid(format!("{field}.name"), format!("listener {:?} is defined twice", l.name)));
            }
            let address = parse_socket_addr(&format!("{field}.address"), &l.address)?;
            if !addrs.insert(address) {
                return Err(invalid(format!("{field}.address"), format!("{address} is used by two listeners")));
            }
            if address == admin {
                return Err(invalid(format!("{field}.address"), format!("{address} is the admin address")));
            }
            if readiness.is_some_and(|r| r.address == address) {
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
                endpoints: Vec::new(),
            });
        }

        let mut seen_eds = HashSet::new();
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
                let addr = parse_socket_addr(&format!("{field}.addresses[{j}]"), a)?;
                if clusters[ci].endpoints.contains(&addr) {
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
                Some(Discovery { url, poll_interval })
            }
        };

        Ok(Config {
            admin,
            readiness,
            outbound_policy: self.outbound_policy,
            listeners,
            routes,
            clusters,
            discovery,
            drain_timeout,
            tcp_idle_timeout,
        })
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

fn check_name(field: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_control() || c == '"') {
        return Err(invalid(field, format!("{name:?} is not a valid name: 1-128 printable characters")));
    }
    Ok(())
}

fn opt_duration(field: &str, s: Option<&str>, default: Duration) -> Result<Duration, Error> {
    match s {
        None => Ok(default),
        Some(s) => parse_duration(s).map_err(|e| invalid(field, e)),
    }
}

/// The typed-payload envelope every discovery endpoint answers with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryResponse<T> {
    pub version_info: String,
    pub resources: Vec<T>,
}

impl<T: serde::de::DeserializeOwned> DiscoveryResponse<T> {
    pub fn from_json(origin: &str, body: &[u8]) -> Result<Self, Error> {
        serde_json::from_slice(body).map_err(|error| Error::Json { origin: origin.to_string(), error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
admin: { address: 127.0.0.1:15090 }
outbound_policy: allow_any
listeners:
  - name: virtual
    address: 0.0.0.0:15000
routes:
  - name: reviews
    destinations: ["reviews:9080", "10.96.0.20:9080"]
    protocol: http
    rules:
      - match: { path_prefix: /, headers: { end-user: jason } }
        clusters: [{ name: reviews-v2, weight: 100 }]
      - clusters: [{ name: reviews-v1, weight: 50 }, { name: reviews-v3, weight: 50 }]
clusters:
  - name: reviews-v1
    lb_policy: round_robin
    connect_timeout: 1s
  - name: reviews-v2
  - name: reviews-v3
    lb_policy: least_request
endpoints:
  - cluster: reviews-v1
    addresses: ["10.200.1.11:9080", "10.200.1.12:9080"]
discovery:
  url: http://127.0.0.1:8500/mesh
  poll_interval: 1s
"#;

    fn err(yaml: &str) -> String {
        match RawConfig::from_yaml("test.yaml", yaml).and_then(|r| r.validate()) {
            Ok(_) => panic!("accepted: {yaml}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_issue_example_validates() {
        let c = RawConfig::from_yaml("x", EXAMPLE).unwrap().validate().unwrap();
        assert_eq!(c.listeners[0].address, "0.0.0.0:15000".parse().unwrap());
        assert_eq!(c.routes[0].destinations[0], Destination::Host { host: "reviews".into(), port: Some(9080) });
        assert_eq!(c.routes[0].destinations[1], Destination::Addr("10.96.0.20:9080".parse().unwrap()));
        assert_eq!(c.routes[0].rules[0].matcher.headers, vec![("end-user".to_string(), "jason".to_string())]);
        assert_eq!(c.clusters[0].connect_timeout, Duration::from_secs(1));
        assert_eq!(c.clusters[0].endpoints.len(), 2);
        assert_eq!(c.clusters[1].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(c.discovery.unwrap().poll_interval, Duration::from_secs(1));
    }

    #[test]
    fn json_is_accepted() {
        let c = RawConfig::from_yaml("x", r#"{"listeners": [{"name": "a", "address": "127.0.0.1:1"}]}"#)
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.admin, DEFAULT_ADMIN_ADDRESS.parse().unwrap());
    }

    #[test]
    fn readiness_is_optional_and_checked() {
        let c = RawConfig::from_yaml("x", "readiness: { address: 0.0.0.0:15021 }\n").unwrap().validate().unwrap();
        assert_eq!(c.readiness, Some(Readiness { address: "0.0.0.0:15021".parse().unwrap() }));
        assert_eq!(RawConfig::default().validate().unwrap().readiness, None);
        let e = err("readiness: { address: 0.0.0.0:15090 }\n");
        let want = "readiness.address: 0.0.0.0:15090 overlaps admin.address 127.0.0.1:15090; use its own port (Istio's is 15021)";
        assert_eq!(e, want);
        let e = err("readiness: { address: 127.0.0.1:1 }\nlisteners: [{ name: a, address: 127.0.0.1:1 }]\n");
        assert_eq!(e, "listeners[0].address: 127.0.0.1:1 is the readiness address");
        assert!(err("readiness: { address: 0.0.0.0:15021, path: /ready }\n").contains("unknown field `path`"));
        assert!(err("readiness: { address: nowhere }\n").starts_with("readiness.address: "));
    }

    #[test]
    fn unknown_field_names_field_and_line() {
        let e = err("listeners:\n  - name: a\n    adress: 127.0.0.1:1\n");
        assert!(e.contains("unknown field `adress`"), "{e}");
        assert!(e.contains("line 3"), "{e}");
        assert!(e.starts_with("test.yaml: "), "{e}");
    }

    #[test]
    fn undefined_cluster_is_named() {
        let e = err("routes:\n - name: r\n   destinations: [a:1]\n   rules: [{clusters: [{name: nope, weight: 1}]}]\n");
        assert_eq!(e, r#"routes[0].rules[0].clusters[0].name: cluster "nope" is not defined in clusters"#);
    }

    #[test]
    fn zero_weight_is_refused() {
        let e = err("clusters: [{name: c}]\nroutes:\n - name: r\n   destinations: [a:1]\n   rules: [{clusters: [{name: c, weight: 0}]}]\n");
        assert_eq!(e, "routes[0].rules[0].clusters[0].weight: weight must be greater than 0");
    }

    #[test]
    fn bad_addresses_and_durations_are_named() {
        let e = err("listeners: [{name: a, address: 'localhost:80'}]");
        assert!(e.starts_with("listeners[0].address: invalid address \"localhost:80\""), "{e}");
        let e = err("clusters: [{name: c, connect_timeout: 5}]");
        assert!(e.starts_with("clusters[0].connect_timeout: invalid duration \"5\""), "{e}");
        let e = err("clusters: [{name: c}]\nendpoints: [{cluster: c, addresses: ['1.2.3.4']}]");
        assert!(e.starts_with("endpoints[0].addresses[0]: invalid address"), "{e}");
        let e = err("endpoints: [{cluster: c, addresses: []}]");
        assert!(e.starts_with("endpoints[0].cluster: cluster \"c\" is not defined"), "{e}");
    }

    #[test]
    fn a_destination_belongs_to_one_route() {
        let e = err(
            "clusters: [{name: c}]\nroutes:\n - {name: a, destinations: ['x:1'], rules: [{clusters: [{name: c}]}]}\n - {name: b, destinations: ['X:1'], rules: [{clusters: [{name: c}]}]}\n",
        );
        assert_eq!(e, r#"routes[1].destinations[0]: x:1 is already routed by route "a""#);
    }

    #[test]
    fn bad_enum_value_lists_choices() {
        let e = err("outbound_policy: allow_some");
        assert!(e.contains("allow_any") && e.contains("registry_only"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("1").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
    }

    #[test]
    fn destinations_parse() {
        assert_eq!(parse_destination("[fd00::1]:80").unwrap(), Destination::Addr("[fd00::1]:80".parse().unwrap()));
        assert_eq!(parse_destination("Reviews").unwrap(), Destination::Host { host: "reviews".into(), port: None });
        assert!(parse_destination("10.0.0.1").is_err());
        assert!(parse_destination("fd00::1:80").is_err());
        assert!(parse_destination("a b:80").is_err());
    }
}

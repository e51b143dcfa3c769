//! The route table: from what the application dialled (original destination, HTTP authority) and
//! the request (path, headers) to a weighted choice of clusters.
//!
//! Built once per config snapshot with every cluster already resolved to its runtime object and
//! every metric handle looked up, so matching a request is hash lookups and comparisons: no lock,
//! no allocation unless the Host header has upper-case letters. A rule without conditions (the
//! usual last rule) is matched by one length check.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http::{HeaderMap, Method, Uri};
use prometheus_client::metrics::counter::Counter;

use crate::{
    config::{self, Destination, PathMatch, Protocol, StringMatch},
    data::{balance, cluster::Cluster, policy::RulePolicy},
    metrics::{Metrics, RequestCounters},
    parse::{self, Host},
};

/// A cluster of a rule with its weight and the counters of this route → cluster pair.
#[derive(Debug)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
    pub requests: RequestCounters,
    pub tcp_connections: Counter,
}

#[derive(Debug)]
pub struct RuleEntry {
    /// Any of them; none matches every request.
    pub matches: Vec<config::Match>,
    pub targets: Vec<Target>,
    /// Running sums of the weights, for [`balance::pick_weighted`].
    cumulative: Vec<u32>,
    /// None: no timeout.
    pub timeout: Option<Duration>,
    /// Retries, fault injection; none for most rules, which then pay one branch for them.
    pub policy: Option<Box<RulePolicy>>,
}

/// What rules look at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    pub uri: &'a Uri,
    pub headers: &'a HeaderMap,
    /// The absolute URI's authority, else the Host header.
    pub authority: Option<&'a str>,
    /// Where the application sent it (the original destination).
    pub dst: SocketAddr,
}

impl RuleEntry {
    /// The index of the first match block the request satisfies (0 for a rule without any).
    pub fn matches(&self, req: &RequestHead) -> Option<usize> {
        if self.matches.is_empty() {
            return Some(0);
        }
        self.matches.iter().position(|m| block_matches(m, req))
    }

    /// Picks a cluster by weight.
    pub fn pick(&self) -> &Target {
        // One cluster, the common case: no random number, so not even the thread-local generator.
        if self.targets.len() == 1 {
            return &self.targets[0];
        }
        let i = balance::with_rng(|rng| balance::pick_weighted(&self.cumulative, rng));
        &self.targets[i]
    }

    /// Whether a TCP connection to `dst` takes this rule: it forwards to clusters and has no
    /// conditions, or a block with only port and subnet conditions that `dst` meets.
    fn takes_tcp(&self, dst: SocketAddr) -> bool {
        !self.targets.is_empty()
            && (self.matches.is_empty() || self.matches.iter().any(|m| m.is_l4() && l4_matches(m, dst)))
    }
}

fn l4_matches(m: &config::Match, dst: SocketAddr) -> bool {
    m.port.is_none_or(|p| p == dst.port())
        && (m.destination_subnets.is_empty() || m.destination_subnets.iter().any(|n| n.contains(&dst.ip())))
}

/// All conditions of one block, cheapest first.
fn block_matches(m: &config::Match, req: &RequestHead) -> bool {
    if !l4_matches(m, req.dst) {
        return false;
    }
    let path = req.uri.path();
    let path_ok = match &m.path {
        PathMatch::Any => true,
        PathMatch::Prefix(p) if m.ignore_uri_case => {
            path.len() >= p.len() && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
        }
        PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        PathMatch::Exact(p) if m.ignore_uri_case => path.eq_ignore_ascii_case(p),
        PathMatch::Exact(p) => path == p,
        PathMatch::Regex(r) => r.regex().is_match(path),
    };
    path_ok
        && m.method.as_ref().is_none_or(|c| c.matches(req.method.as_str()))
        // Plaintext HTTP/1.1 from the application: `http` unless an absolute URI says otherwise.
        && m.scheme.as_ref().is_none_or(|c| c.matches(req.uri.scheme_str().unwrap_or("http")))
        && m.authority.as_ref().is_none_or(|c| req.authority.is_some_and(|a| c.matches(a)))
        && m.headers.iter().all(|(name, c)| header_matches(req.headers, name, c))
        && !m.without_headers.iter().any(|(name, c)| header_matches(req.headers, name, c))
        && m.query_params.iter().all(|(name, c)| query_param(req.uri.query(), name).is_some_and(|v| c.matches(v)))
}

/// Whether the request has header `name` satisfying `c` (any of a repeated header's values).
fn header_matches(headers: &HeaderMap, name: &str, c: &StringMatch) -> bool {
    match c {
        StringMatch::Present => headers.contains_key(name),
        c => headers.get_all(name).iter().any(|v| v.to_str().is_ok_and(|v| c.matches(v))),
    }
}

/// The first value of query parameter `name`, as sent (not percent-decoded); `""` for a bare
/// `?name`.
fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?.split('&').find_map(|pair| match pair.split_once('=') {
        Some((k, v)) if k == name => Some(v),
        None if pair == name => Some(""),
        _ => None,
    })
}

#[derive(Debug)]
pub struct RouteEntry {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub rules: Vec<RuleEntry>,
}

impl RouteEntry {
    /// The first rule that matches the request, and which of its match blocks did.
    pub fn rule_for(&self, req: &RequestHead) -> Option<(&RuleEntry, usize)> {
        self.rules.iter().find_map(|r| r.matches(req).map(|i| (r, i)))
    }

    /// The rule a TCP connection to `dst` uses: the first forwarding to clusters whose
    /// conditions a connection can meet (HTTP's are never met).
    pub fn tcp_rule(&self, dst: SocketAddr) -> Option<&RuleEntry> {
        self.rules.iter().find(|r| r.takes_tcp(dst))
    }
}

/// Routes of one host name, by port.
#[derive(Debug, Default)]
struct HostRoutes {
    ports: HashMap<u16, usize>,
    any_port: Option<usize>,
}

#[derive(Debug, Default)]
pub struct RouteTable {
    pub routes: Vec<RouteEntry>,
    by_addr: HashMap<SocketAddr, usize>,
    by_host: HashMap<Box<str>, HostRoutes>,
    /// Ports some host route names: a connection to an unrouted address on such a port may still
    /// be HTTP for one of those hosts, so it is worth detecting. A host route without a port does
    /// not make every port a candidate: that would hold every server-first protocol for the
    /// detection timeout and read traffic no route asked for (it broke WebSocket passthrough on
    /// every port); it matches requests on connections that are HTTP for another reason.
    host_ports: HashSet<u16>,
}

impl RouteTable {
    /// Builds the table; `clusters` must hold every cluster the config names (validation did that).
    pub fn new(routes: &[config::Route], clusters: &HashMap<&str, Arc<Cluster>>, metrics: &Metrics) -> Self {
        let mut t = RouteTable::default();
        for (i, r) in routes.iter().enumerate() {
            for d in &r.destinations {
                match d {
                    Destination::Addr(a) => {
                        t.by_addr.insert(*a, i);
                    }
                    Destination::Host { host, port } => {
                        let h = t.by_host.entry(host.as_str().into()).or_default();
                        match port {
                            Some(p) => {
                                h.ports.insert(*p, i);
                                t.host_ports.insert(*p);
                            }
                            None => h.any_port = Some(i),
                        }
                    }
                }
            }
            let rules = r
                .rules
                .iter()
                .map(|rule| {
                    let targets: Vec<Target> = rule
                        .clusters
                        .iter()
                        .map(|wc| Target {
                            cluster: clusters[wc.name.as_str()].clone(),
                            weight: wc.weight,
                            requests: metrics.request_counters(&r.name, &wc.name),
                            tcp_connections: metrics.tcp_counter(&r.name, &wc.name),
                        })
                        .collect();
                    let cumulative = targets
                        .iter()
                        .scan(0u32, |sum, t| {
                            *sum += t.weight;
                            Some(*sum)
                        })
                        .collect();
                    RuleEntry {
                        matches: rule.matches.clone(),
                        targets,
                        cumulative,
                        timeout: rule.timeout,
                        policy: RulePolicy::new(&r.name, rule, metrics),
                    }
                })
                .collect();
            t.routes.push(RouteEntry { name: r.name.as_str().into(), protocol: r.protocol, rules });
        }
        t
    }

    /// The route claiming an original destination `ip:port`.
    pub fn by_addr(&self, addr: SocketAddr) -> Option<&RouteEntry> {
        self.index_by_addr(addr).map(|i| &self.routes[i])
    }

    pub fn index_by_addr(&self, addr: SocketAddr) -> Option<usize> {
        self.by_addr.get(&addr).copied()
    }

    /// Whether an HTTP request to `port` could match a host route named with that port.
    pub fn has_host_routes_for(&self, port: u16) -> bool {
        self.host_ports.contains(&port)
    }

    /// Whether any route names a host (with or without a port).
    pub fn has_host_routes(&self) -> bool {
        !self.by_host.is_empty()
    }

    /// The route for an HTTP request: by original destination first, then by its authority (the
    /// `Host` header or the absolute URI's authority), whose port defaults to the destination's.
    pub fn for_request(&self, orig_dst: SocketAddr, authority: Option<&str>) -> Option<&RouteEntry> {
        if let Some(r) = self.by_addr(orig_dst) {
            return Some(r);
        }
        let a = parse::authority(authority?).ok()?;
        let port = a.port.unwrap_or(orig_dst.port());
        let host = match a.host {
            Host::Ip(ip) => return self.by_addr(SocketAddr::new(ip, port)),
            Host::Name(name) => name,
        };
        let lower;
        let host = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = host.to_ascii_lowercase();
            lower.as_str()
        } else {
            host
        };
        let h = self.by_host.get(host)?;
        h.ports.get(&port).or(h.any_port.as_ref()).map(|&i| &self.routes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::RawConfig, data::cluster::EndpointRegistry};

    fn table(yaml: &str) -> RouteTable {
        let cfg = RawConfig::from_yaml("t", yaml).unwrap().validate().unwrap().routing;
        let metrics = Metrics::new();
        let reg = EndpointRegistry::default();
        let clusters: Vec<(String, Arc<Cluster>)> = cfg
            .clusters
            .iter()
            .map(|c| (c.name.clone(), Arc::new(Cluster::new(c, &mut reg.lock(), &metrics))))
            .collect();
        let map = clusters.iter().map(|(n, c)| (n.as_str(), c.clone())).collect();
        RouteTable::new(&cfg.routes, &map, &metrics)
    }

    const CFG: &str = r#"
clusters: [{name: v1}, {name: v2}, {name: v3}, {name: db}]
routes:
  - name: reviews
    destinations: ["reviews:9080", "10.96.0.20:9080", "[fd00:200::20]:9080"]
    rules:
      - match: { path_prefix: /api, headers: { end-user: jason } }
        clusters: [{ name: v2 }]
      - match: { path: /exact }
        clusters: [{ name: v3 }]
      - clusters: [{ name: v1, weight: 50 }, { name: v3, weight: 50 }]
  - name: any-port
    destinations: ["ratings"]
    rules: [{clusters: [{name: v1}]}]
  - name: mysql
    destinations: ["10.96.0.30:3306", "10.97.0.30:3306"]
    protocol: tcp
    rules:
      - match: { headers: { x: y } }
        clusters: [{ name: v2 }]
      - match: { destination_subnets: ["10.97.0.0/16"] }
        clusters: [{ name: v3 }]
      - clusters: [{ name: db }]
  - name: istio
    destinations: ["10.96.0.40:80"]
    rules:
      - match:
          - { path_regex: "/v[0-9]+/.*", method: GET }
          - { path_prefix: /ADMIN, ignore_uri_case: true, without_headers: { x-debug: {} } }
        clusters: [{ name: v1 }]
      - match: { headers: { x-canary: {} }, query_params: { u: { regex: "a.*" } } }
        clusters: [{ name: v2 }]
      - match: { authority: { prefix: "istio." }, scheme: http, port: 80 }
        clusters: [{ name: v3 }]
      - match: { headers: { x-env: { prefix: prod } }, port: 81 }
        clusters: [{ name: v3 }]
      - clusters: [{ name: db }]
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The cluster of the rule a request gets, with its match block.
    fn decide(
        r: &RouteEntry,
        method: &str,
        uri: &str,
        h: &[(&'static str, &'static str)],
        host: Option<&str>,
    ) -> String {
        let (method, uri, headers) = (method.parse().unwrap(), uri.parse().unwrap(), headers(h));
        let head =
            RequestHead { method: &method, uri: &uri, headers: &headers, authority: host, dst: addr("10.96.0.40:80") };
        let (rule, block) = r.rule_for(&head).expect("a rule matches");
        format!("{}#{block}", rule.targets[0].cluster.name)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn original_destination_wins_then_authority() {
        let t = table(CFG);
        let other = addr("10.1.1.1:9080");
        assert_eq!(&*t.for_request(addr("10.96.0.20:9080"), Some("whatever")).unwrap().name, "reviews");
        assert_eq!(&*t.for_request(addr("[fd00:200::20]:9080"), None).unwrap().name, "reviews");
        assert_eq!(&*t.for_request(other, Some("reviews")).unwrap().name, "reviews");
        assert_eq!(&*t.for_request(other, Some("Reviews:9080")).unwrap().name, "reviews");
        assert_eq!(&*t.for_request(other, Some("reviews.:9080")).unwrap().name, "reviews");
        assert!(t.for_request(other, Some("reviews:9081")).is_none());
        assert!(t.for_request(addr("10.1.1.1:80"), Some("reviews")).is_none());
        assert_eq!(&*t.for_request(addr("10.1.1.1:1"), Some("ratings:777")).unwrap().name, "any-port");
        assert_eq!(&*t.for_request(other, Some("10.96.0.20:9080")).unwrap().name, "reviews");
        assert!(t.for_request(other, None).is_none());
        assert!(t.has_host_routes_for(9080));
        assert!(!t.has_host_routes_for(1), "a port-less host route does not make every port a candidate");
    }

    #[test]
    fn first_matching_rule_wins() {
        let t = table(CFG);
        let r = t.by_addr(addr("10.96.0.20:9080")).unwrap();
        let pick = |path, h| decide(r, "GET", path, h, None);
        assert_eq!(pick("/api/x", &[("end-user", "jason")]), "v2#0");
        assert_eq!(pick("/api/x", &[("end-user", "bob")]), "v1#0");
        assert_eq!(pick("/other", &[("end-user", "jason")]), "v1#0");
        assert_eq!(pick("/exact", &[]), "v3#0");
        assert_eq!(pick("/exact?q=1", &[]), "v3#0", "the query string is not part of the path");
        assert_eq!(pick("/exact/", &[]), "v1#0");
        // A repeated header matches when any of its values does.
        assert_eq!(pick("/api", &[("end-user", "bob"), ("end-user", "jason")]), "v2#0");
    }

    #[test]
    fn istio_conditions() {
        let t = table(CFG);
        let r = t.by_addr(addr("10.96.0.40:80")).unwrap();
        let get = |uri, h| decide(r, "GET", uri, h, Some("istio.example:80"));
        // Blocks are ORed, the conditions of one ANDed; the regex matches the whole path.
        assert_eq!(get("/v2/x", &[]), "v1#0");
        assert_eq!(decide(r, "POST", "/v2/x", &[], None), "db#0");
        assert_eq!(get("/xv2/x", &[]), "v3#0");
        assert_eq!(get("/v2", &[]), "v3#0", "the regex needs the slash after the version");
        assert_eq!(get("/admin/users", &[]), "v1#1", "ignore_uri_case");
        assert_eq!(get("/admin/users", &[("x-debug", "")]), "v3#0", "without_headers: present, any value");
        // Presence, and a query parameter by regex (not decoded, first occurrence).
        assert_eq!(get("/q?u=abc", &[("x-canary", "")]), "v2#0");
        assert_eq!(get("/q?x=1&u=abc&u=z", &[("x-canary", "no")]), "v2#0");
        assert_eq!(get("/q?u=zzz", &[("x-canary", "")]), "v3#0");
        assert_eq!(get("/q?u=abc", &[]), "v3#0", "x-canary absent");
        // Authority by prefix; scheme http for origin-form requests; the destination port.
        assert_eq!(decide(r, "GET", "/", &[], Some("other")), "db#0");
        assert_eq!(decide(r, "GET", "/", &[], None), "db#0", "no authority: an authority condition fails");
        assert_eq!(decide(r, "GET", "https://istio.x/", &[], Some("istio.x")), "db#0");
        assert_eq!(get("/", &[("x-env", "production")]), "v3#0");
        assert_eq!(decide(r, "GET", "/", &[("x-env", "production")], None), "db#0", "port 81 is not the destination");
    }

    #[test]
    fn tcp_takes_the_first_rule_its_destination_meets() {
        let t = table(CFG);
        let r = t.by_addr(addr("10.96.0.30:3306")).unwrap();
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(&*r.tcp_rule(addr("10.96.0.30:3306")).unwrap().targets[0].cluster.name, "db");
        assert_eq!(&*r.tcp_rule(addr("10.97.0.30:3306")).unwrap().targets[0].cluster.name, "v3");
    }

    #[test]
    fn per_request_split_follows_weights() {
        let t = table(CFG);
        let rule = &t.by_addr(addr("10.96.0.20:9080")).unwrap().rules[2];
        let n = 20_000;
        let v1 = (0..n).filter(|_| &*rule.pick().cluster.name == "v1").count();
        assert!((9_400..10_600).contains(&v1), "v1 got {v1} of {n}");
    }
}

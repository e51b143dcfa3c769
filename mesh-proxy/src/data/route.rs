//! The route table: from what the application dialled (original destination, HTTP authority) and
//! the request (path, headers) to a weighted choice of clusters.
//!
//! Built once per config snapshot with every cluster already resolved to its runtime object and
//! every metric handle looked up, so matching a request is hash lookups and comparisons: no lock,
//! no allocation unless the Host header has upper-case letters.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use http::HeaderMap;
use prometheus_client::metrics::counter::Counter;

use crate::{
    config::{self, Destination, PathMatch, Protocol},
    data::{balance, cluster::Cluster},
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
    pub matcher: config::Match,
    pub targets: Vec<Target>,
    /// Running sums of the weights, for [`balance::pick_weighted`].
    cumulative: Vec<u32>,
    pub timeout: Duration,
}

impl RuleEntry {
    pub fn matches(&self, path: &str, headers: &HeaderMap) -> bool {
        let path_ok = match &self.matcher.path {
            PathMatch::Any => true,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
        };
        path_ok
            && self
                .matcher
                .headers
                .iter()
                .all(|(name, value)| headers.get_all(name.as_str()).iter().any(|v| v.as_bytes() == value.as_bytes()))
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

    fn is_unconditional(&self) -> bool {
        self.matcher == config::Match::default()
    }
}

#[derive(Debug)]
pub struct RouteEntry {
    pub name: Arc<str>,
    pub protocol: Protocol,
    pub rules: Vec<RuleEntry>,
}

impl RouteEntry {
    /// The first rule that matches the request.
    pub fn rule_for(&self, path: &str, headers: &HeaderMap) -> Option<&RuleEntry> {
        self.rules.iter().find(|r| r.matches(path, headers))
    }

    /// The rule a TCP connection uses: the first without conditions (path and headers are HTTP's).
    pub fn tcp_rule(&self) -> Option<&RuleEntry> {
        self.rules.iter().find(|r| r.is_unconditional())
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
                    RuleEntry { matcher: rule.matcher.clone(), targets, cumulative, timeout: rule.timeout }
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
    destinations: ["10.96.0.30:3306"]
    protocol: tcp
    rules:
      - match: { headers: { x: y } }
        clusters: [{ name: v2 }]
      - clusters: [{ name: db }]
"#;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
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
        let pick = |path, h: &HeaderMap| r.rule_for(path, h).unwrap().targets[0].cluster.name.to_string();
        assert_eq!(pick("/api/x", &headers(&[("end-user", "jason")])), "v2");
        assert_eq!(pick("/api/x", &headers(&[("end-user", "bob")])), "v1");
        assert_eq!(pick("/other", &headers(&[("end-user", "jason")])), "v1");
        assert_eq!(pick("/exact", &headers(&[])), "v3");
        assert_eq!(pick("/exact/", &headers(&[])), "v1");
        // A repeated header matches when any of its values does.
        assert_eq!(pick("/api", &headers(&[("end-user", "bob"), ("end-user", "jason")])), "v2");
    }

    #[test]
    fn tcp_uses_the_first_unconditional_rule() {
        let t = table(CFG);
        let r = t.by_addr(addr("10.96.0.30:3306")).unwrap();
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(&*r.tcp_rule().unwrap().targets[0].cluster.name, "db");
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

//! Istio's traffic API and the service registry, translated into mesh-proxy's four objects the way
//! istiod builds a sidecar's config:
//!
//! - one cluster per service port, `outbound|9080||reviews.default.svc.cluster.local`, and one per
//!   port and DestinationRule subset, `outbound|9080|v1|reviews.default.svc.cluster.local`, whose
//!   endpoints are the ready endpoints carrying the subset's labels ([`cluster`]);
//! - one route per service port, named `reviews.default.svc.cluster.local:9080`, claiming what
//!   Istio's virtual host lists as domains: the FQDN, `name.namespace`, `name.namespace.svc`, the
//!   ClusterIP, and for proxies of the service's own namespace the short name — each with the port
//!   (mesh-proxy defaults an authority's port to the connection's original port, so `reviews`
//!   and `reviews:9080` are both matched by `reviews:9080`). Its rules come from the
//!   VirtualService for the host ([`route`]), or are Istio's default route (everything to the
//!   port's cluster) when there is none.
//!
//! Each Istio field is translated (or reported as not carried) in exactly one function of
//! [`route`] or [`cluster`]; a reference that does not resolve (a host without a service, a
//! subset no DestinationRule defines) becomes a cluster without endpoints, so the proxy answers
//! 503 as Envoy does for a missing cluster, and is reported.
//!
//! Scopes: what differs between namespaces is which services and VirtualServices are visible
//! (`exportTo`, Sidecar egress hosts) and the short names; everything per service is computed once
//! per build and shared by every scope.

pub mod cluster;
pub mod route;

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet, HashMap},
    net::SocketAddr,
    sync::Arc,
};

use mesh_proxy::config::{self as proxy, RawCluster, RawListener, RawRoute, RawRule, RawWeightedCluster};
use serde::Serialize;

use crate::{
    analysis::{Code, Finding, Findings},
    model::{self, Health, Protocol, Registry, Service, Store},
    resource::{Body, Key, Kind, Object},
};

/// Istio's root namespace: a Sidecar there without a selector is every namespace's default.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Debug, Clone)]
pub struct Options {
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    pub root_namespace: String,
    /// The listener served to every proxy; `None` serves no listeners (the proxy's own file's
    /// listeners stay in force).
    pub listener: Option<SocketAddr>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            domain: model::DEFAULT_DOMAIN.into(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.into(),
            listener: Some(SocketAddr::from(([0, 0, 0, 0], mesh_common::ports::PROXY))),
        }
    }
}

/// Which endpoints a cluster serves: a service's port, restricted to a subset's labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct EdsKey {
    pub hostname: String,
    pub port: u16,
    pub labels: BTreeMap<String, String>,
}

/// A cluster and where its endpoints come from (`None`: a cluster for a reference that did not
/// resolve, which has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOut {
    pub cluster: RawCluster,
    pub eds: Option<EdsKey>,
}

/// One service port's route, before the scope adds the destinations it claims.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RouteOut {
    port: u16,
    protocol: proxy::Protocol,
    rules: Vec<RawRule>,
}

/// Everything one service contributes to a scope, given the VirtualService chosen for it.
#[derive(Debug, Default)]
struct ServiceOut {
    routes: Vec<RouteOut>,
    /// Every cluster the rules name: this service's, another's, or one for an unresolved name.
    referenced: Vec<ClusterOut>,
}

/// What one namespace's proxies get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScopeConfig {
    pub listeners: Vec<RawListener>,
    pub routes: Vec<RawRoute>,
    pub clusters: Vec<RawCluster>,
    /// Per cluster (same order as `clusters`), where its endpoints come from.
    pub eds: Vec<Option<EdsKey>>,
}

pub fn cluster_name(port: u16, subset: &str, hostname: &str) -> String {
    format!("outbound|{port}|{subset}|{hostname}")
}

/// A service's host and the VirtualService chosen for it.
type MemoKey = (String, Option<Key>);

/// One build of the translation: the per-service work, done once and shared by the scopes.
pub struct Translator<'a> {
    registry: &'a Registry,
    opts: &'a Options,
    /// VirtualServices applying to sidecars, per resolved host, oldest first.
    virtual_services: HashMap<String, Vec<&'a Arc<Object>>>,
    /// Every service's own clusters (per port, and per port and subset), by service.
    clusters: BTreeMap<String, Vec<ClusterOut>>,
    /// Subsets per host (from every DestinationRule for it, merged): name → labels.
    subsets: HashMap<String, BTreeMap<String, BTreeMap<String, String>>>,
    /// The Sidecar in force per namespace (none: everything visible).
    sidecars: HashMap<String, &'a Arc<Object>>,
    memo: RefCell<HashMap<MemoKey, Arc<ServiceOut>>>,
    findings: RefCell<Findings>,
}

impl<'a> Translator<'a> {
    pub fn new(store: &'a Store, registry: &'a Registry, opts: &'a Options) -> Translator<'a> {
        let mut f = Findings::default();
        let virtual_services = index_virtual_services(store, registry, opts, &mut f);
        let (clusters, subsets) = cluster::service_clusters(store, registry, opts, &mut f);
        let sidecars = index_sidecars(store, opts, &mut f);
        for errs in store.errors.values() {
            for e in errs {
                f.push(Finding::parse_error(e));
            }
        }
        for obj in store.of_kind(Kind::LocalRateLimit) {
            let Body::LocalRateLimit(rl) = &obj.body else { continue };
            let host = resolve_host(&rl.host, &obj.meta.key.namespace, &opts.domain);
            if !registry.services.contains_key(&host) {
                let msg = format!("Referenced host not found: {:?}", rl.host);
                f.add(Code::ReferencedResourceNotFound, &obj.meta, "spec.host", msg);
            }
            if let Err(e) = mesh_proxy::parse::duration(&rl.fill_interval) {
                f.add(Code::SchemaValidationError, &obj.meta, "spec.fillInterval", e);
            }
            let msg = "local rate limits are not carried by mesh-proxy yet (its traffic policy issue): this resource has no effect";
            f.add(Code::NotCarriedByProxy, &obj.meta, "spec", msg);
        }
        Translator {
            registry,
            opts,
            virtual_services,
            clusters,
            subsets,
            sidecars,
            memo: RefCell::new(HashMap::new()),
            findings: RefCell::new(f),
        }
    }

    /// Every finding, with every VirtualService translated against every service it names
    /// (including those that lose a conflict or are not visible anywhere).
    pub fn analyze(&self) -> Vec<Finding> {
        for (host, list) in &self.virtual_services {
            for vs in list {
                self.service_out(host, Some(vs));
            }
        }
        self.findings.borrow().clone().into_vec()
    }

    /// The config of the proxies in `namespace`.
    pub fn scope(&self, namespace: &str) -> ScopeConfig {
        let mut out = ScopeConfig::default();
        if let Some(addr) = self.opts.listener {
            // Not transparent here: a TPROXY pod's proxy is told so by its injected environment.
            let virtual_listener = RawListener {
                name: "virtual".into(),
                address: addr.to_string(),
                transparent: false,
                tproxy_mark: None,
            };
            out.listeners.push(virtual_listener);
        }
        let sidecar = self.sidecars.get(namespace).or_else(|| self.sidecars.get(&self.opts.root_namespace));
        let mut claimed: BTreeSet<String> = BTreeSet::new();
        let mut clusters: BTreeMap<String, ClusterOut> = BTreeMap::new();
        for svc in self.registry.services.values() {
            if !svc.visible_in(namespace) || !sidecar.is_none_or(|s| egress_allows(s, namespace, svc)) {
                continue;
            }
            let vs = self
                .virtual_services
                .get(&svc.hostname)
                .and_then(|list| list.iter().find(|v| vs_visible(v, namespace)))
                .copied();
            let so = self.service_out(&svc.hostname, vs);
            for r in &so.routes {
                let mut destinations = Vec::new();
                for d in destinations_for(svc, r.port, namespace) {
                    if claimed.insert(d.clone()) {
                        destinations.push(d);
                    }
                }
                if destinations.is_empty() {
                    continue;
                }
                out.routes.push(RawRoute {
                    name: format!("{}:{}", svc.hostname, r.port),
                    destinations,
                    protocol: r.protocol,
                    rules: r.rules.clone(),
                });
            }
            let own = self.clusters.get(&svc.hostname).into_iter().flatten();
            // Clusters a route names that are not the service's own: another service's (also
            // when that service is outside the scope), or one for an unresolved reference.
            for c in own.chain(&so.referenced) {
                clusters.entry(c.cluster.name.clone()).or_insert_with(|| c.clone());
            }
        }
        for c in clusters.into_values() {
            out.clusters.push(c.cluster);
            out.eds.push(c.eds);
        }
        out
    }

    /// The routes of one service with the given VirtualService, computed once per build.
    fn service_out(&self, hostname: &str, vs: Option<&Arc<Object>>) -> Arc<ServiceOut> {
        let key = (hostname.to_string(), vs.map(|v| v.meta.key.clone()));
        if let Some(out) = self.memo.borrow().get(&key) {
            return out.clone();
        }
        let mut f = Findings::default();
        let out = Arc::new(match self.registry.services.get(hostname) {
            Some(svc) => route::service_routes(self, svc, vs.map(|v| &**v), &mut f),
            None => ServiceOut::default(),
        });
        self.findings.borrow_mut().extend(f);
        self.memo.borrow_mut().insert(key, out.clone());
        out
    }

    /// The cluster a destination names: a service's own, or, for a host or subset that does
    /// not exist, a cluster without endpoints (the proxy answers 503, as Envoy does when a
    /// route names a cluster it lacks).
    fn destination_cluster(&self, host: &str, port: u16, subset: Option<&str>) -> ClusterOut {
        let name = cluster_name(port, subset.unwrap_or(""), host);
        if let Some(c) = self.clusters.get(host).and_then(|cs| cs.iter().find(|c| c.cluster.name == name)) {
            return c.clone();
        }
        ClusterOut { cluster: RawCluster { name, ..Default::default() }, eds: None }
    }
}

impl Findings {
    fn extend(&mut self, other: Findings) {
        for f in other.into_vec() {
            self.push(f);
        }
    }
}

/// Istio's short-name rule: a host without a dot is a service of the object's namespace.
pub fn resolve_host(host: &str, namespace: &str, domain: &str) -> String {
    let host = host.to_ascii_lowercase();
    if host.contains('.') || host.contains('*') {
        host
    } else {
        format!("{host}.{namespace}.svc.{domain}")
    }
}

fn applies_to_sidecars(gateways: &[String]) -> bool {
    gateways.is_empty() || gateways.iter().any(|g| g == "mesh")
}

fn vs_visible(vs: &Object, namespace: &str) -> bool {
    let Body::VirtualService(spec) = &vs.body else { return false };
    model::visible(&spec.export_to, &vs.meta.key.namespace, namespace)
}

/// Oldest first, then by namespace and name: Istio's order between conflicting rules.
fn age_order(a: &Object, b: &Object) -> std::cmp::Ordering {
    (a.meta.created.as_deref(), &a.meta.key).cmp(&(b.meta.created.as_deref(), &b.meta.key))
}

fn index_virtual_services<'a>(
    store: &'a Store,
    registry: &Registry,
    opts: &Options,
    f: &mut Findings,
) -> HashMap<String, Vec<&'a Arc<Object>>> {
    let mut list: Vec<&Arc<Object>> = store.of_kind(Kind::VirtualService).collect();
    list.sort_by(|a, b| age_order(a, b));
    let mut by_host: HashMap<String, Vec<&Arc<Object>>> = HashMap::new();
    for vs in list {
        let Body::VirtualService(spec) = &vs.body else { continue };
        f.not_carried(&vs.meta, "spec", &spec.other);
        if !applies_to_sidecars(&spec.gateways) {
            continue;
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            let field = format!("spec.hosts[{i}]");
            if h.contains('*') {
                let msg = format!("wildcard host {h:?}: mesh-proxy routes by exact host names; not applied");
                f.add(Code::NotCarriedByProxy, &vs.meta, field, msg);
                continue;
            }
            let host = resolve_host(h, &vs.meta.key.namespace, &opts.domain);
            if !registry.services.contains_key(&host) {
                f.add(Code::ReferencedResourceNotFound, &vs.meta, field, format!("Referenced host not found: {h:?}"));
                continue;
            }
            let entry = by_host.entry(host.clone()).or_default();
            if let Some(first) = entry.iter().find(|other| overlaps(other, vs)) {
                let name = |o: &Object| format!("{}/{}", o.meta.key.namespace, o.meta.key.name);
                let msg = format!(
                    "The VirtualServices {} and {} associated with mesh define the same host {host:?}; the older, {}, applies",
                    name(first),
                    name(vs),
                    name(first)
                );
                f.add(Code::ConflictingMeshGatewayVirtualServiceHosts, &vs.meta, field, msg);
            }
            entry.push(vs);
        }
    }
    by_host
}

/// Whether some namespace sees both VirtualServices.
fn overlaps(a: &Object, b: &Object) -> bool {
    let export = |o: &Object| match &o.body {
        Body::VirtualService(s) => s.export_to.clone(),
        _ => Vec::new(),
    };
    let (ea, eb) = (export(a), export(b));
    let public = |e: &[String]| e.is_empty() || e.iter().any(|x| x == "*");
    if public(&ea) || public(&eb) {
        return true;
    }
    let names = |e: &[String], own: &str| -> BTreeSet<String> {
        e.iter().map(|x| if x == "." { own.to_string() } else { x.clone() }).collect()
    };
    !names(&ea, &a.meta.key.namespace).is_disjoint(&names(&eb, &b.meta.key.namespace))
}

fn index_sidecars<'a>(store: &'a Store, _opts: &Options, f: &mut Findings) -> HashMap<String, &'a Arc<Object>> {
    let mut list: Vec<&Arc<Object>> = store.of_kind(Kind::Sidecar).collect();
    list.sort_by(|a, b| age_order(a, b));
    let mut out: HashMap<String, &Arc<Object>> = HashMap::new();
    for sc in list {
        let Body::Sidecar(spec) = &sc.body else { continue };
        f.not_carried(&sc.meta, "spec", &spec.other);
        for (i, e) in spec.egress.iter().enumerate() {
            f.not_carried(&sc.meta, &format!("spec.egress[{i}]"), &e.other);
        }
        if spec.workload_selector.is_some() {
            let msg = "mesh-pilot scopes config per namespace, not per workload: a Sidecar with a workload selector is not applied";
            f.add(Code::NotCarriedByProxy, &sc.meta, "spec.workloadSelector", msg);
            continue;
        }
        let ns = sc.meta.key.namespace.clone();
        if let Some(first) = out.get(&ns) {
            let msg = format!(
                "More than one Sidecar in namespace {ns:?} has no workload selector; {} applies",
                first.meta.key
            );
            f.add(Code::MultipleSidecarsWithoutWorkloadSelectors, &sc.meta, "", msg);
            continue;
        }
        out.insert(ns, sc);
    }
    out
}

/// Istio's egress `hosts` rule: `namespace/host`, `*` any namespace, `.` the proxy's own, `~`
/// none; the host exact, `*` or `*.suffix`.
fn egress_allows(sidecar: &Object, namespace: &str, svc: &Service) -> bool {
    let Body::Sidecar(spec) = &sidecar.body else { return true };
    spec.egress.iter().flat_map(|e| &e.hosts).any(|entry| {
        let (ns, host) = entry.split_once('/').unwrap_or(("*", entry.as_str()));
        let ns_ok = ns == "*" || (ns == "." && svc.namespace == namespace) || ns == svc.namespace;
        let host_ok = host == "*"
            || host.eq_ignore_ascii_case(&svc.hostname)
            || host.strip_prefix('*').is_some_and(|suffix| svc.hostname.ends_with(&suffix.to_ascii_lowercase()));
        ns_ok && host_ok
    })
}

/// What a route for `svc:port` claims in a proxy of `namespace` (see the module comment).
fn destinations_for(svc: &Service, port: u16, namespace: &str) -> Vec<String> {
    let mut d = vec![format!("{}:{port}", svc.hostname)];
    if svc.source == model::ServiceSource::Kubernetes {
        d.push(format!("{}.{}.svc:{port}", svc.name, svc.namespace));
        d.push(format!("{}.{}:{port}", svc.name, svc.namespace));
        if svc.namespace == namespace {
            d.push(format!("{}:{port}", svc.name));
        }
    }
    for a in &svc.addresses {
        d.push(SocketAddr::new(*a, port).to_string());
    }
    d
}

/// The addresses a cluster's endpoints are, from the registry.
pub fn endpoints(registry: &Registry, key: &EdsKey) -> Vec<String> {
    let Some(svc) = registry.services.get(&key.hostname) else { return Vec::new() };
    let Some(port) = svc.port(key.port) else { return Vec::new() };
    let mut out: Vec<String> = registry
        .endpoints
        .get(&key.hostname)
        .into_iter()
        .flatten()
        .filter(|e| e.health == Health::Ready && model::selects(&key.labels, &e.labels))
        .filter_map(|e| {
            // A slice with one unnamed port serves a service with one port, whatever its name.
            let single = svc.ports.len() == 1 && e.ports.len() == 1;
            let p = e
                .ports
                .get(&port.name)
                .copied()
                .or_else(|| single.then(|| e.ports.values().next().copied()).flatten())?;
            Some(SocketAddr::new(e.address, p).to_string())
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The route protocol for a service port (HTTP/2 and gRPC are carried as TCP: mesh-proxy's HTTP
/// routing is HTTP/1.1).
fn proxy_protocol(p: Protocol) -> proxy::Protocol {
    match p {
        Protocol::Http => proxy::Protocol::Http,
        Protocol::Unknown => proxy::Protocol::Auto,
        Protocol::Http2 | Protocol::Tcp | Protocol::Udp => proxy::Protocol::Tcp,
    }
}

/// Istio's default route: everything to the port's cluster.
fn default_rule(svc: &Service, port: u16) -> RawRule {
    RawRule {
        clusters: vec![RawWeightedCluster { name: cluster_name(port, "", &svc.hostname), weight: 100, headers: None }],
        ..Default::default()
    }
}

//! The one model both platform adapters feed: the objects as delivered ([`Store`]) and what they
//! mean for routing ([`Registry`]: services with their ports and endpoints, labels and health).
//!
//! Adapters only ever say "this object is now this" or "this object is gone"; everything derived
//! (which Pods a slice's endpoints are, which Pods a selector picks when a Service has no
//! EndpointSlice, which WorkloadEntries a ServiceEntry selects) is computed here, once.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::{api::core::v1 as core, apimachinery::pkg::util::intstr::IntOrString};
use serde::Serialize;

use crate::{
    istio,
    resource::{Body, Key, Kind, Object, ParseError},
};

/// Kubernetes' default cluster domain.
pub const DEFAULT_DOMAIN: &str = "cluster.local";
/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Istio's Service annotation with the namespaces a Service is visible to.
const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// One change from an adapter.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert(Object),
    Delete(Key),
    /// A source (a file) could not be read or has objects that do not parse: shown in the
    /// analysis, while the source's last good objects stay.
    Errors {
        source: String,
        errors: Vec<ParseError>,
    },
}

/// What a batch of changes touched: config (debounced) or only endpoints (pushed at once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    pub config: bool,
    pub endpoints: bool,
}

/// Every object the adapters delivered, by identity.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub objects: BTreeMap<Key, Arc<Object>>,
    /// Parse errors per source, for the analysis.
    pub errors: BTreeMap<String, Vec<ParseError>>,
}

impl Store {
    pub fn apply(&mut self, changes: impl IntoIterator<Item = Change>) -> Touched {
        let mut touched = Touched::default();
        let mark = |touched: &mut Touched, kind: Kind| {
            if kind.is_endpoint_kind() {
                touched.endpoints = true;
            } else {
                touched.config = true;
            }
        };
        for change in changes {
            match change {
                Change::Upsert(obj) => {
                    let key = obj.meta.key.clone();
                    if self.objects.get(&key).is_some_and(|old| **old == obj) {
                        continue;
                    }
                    mark(&mut touched, key.kind);
                    self.objects.insert(key, Arc::new(obj));
                }
                Change::Delete(key) => {
                    if self.objects.remove(&key).is_some() {
                        mark(&mut touched, key.kind);
                    }
                }
                Change::Errors { source, errors } => {
                    let changed = if errors.is_empty() {
                        self.errors.remove(&source).is_some()
                    } else {
                        self.errors.insert(source, errors.clone()).as_ref() != Some(&errors)
                    };
                    // Errors change the analysis, which is part of the config view.
                    touched.config |= changed;
                }
            }
        }
        touched
    }

    pub fn of_kind(&self, kind: Kind) -> impl Iterator<Item = &Arc<Object>> {
        let start = Key { kind, namespace: String::new(), name: String::new() };
        self.objects.range(start..).take_while(move |(k, _)| k.kind == kind).map(|(_, o)| o)
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Arc<Object>> {
        self.objects.get(&Key { kind, namespace: namespace.into(), name: name.into() })
    }
}

/// How a service port's traffic is understood, from Istio's port naming rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http,
    /// HTTP/2 and gRPC.
    Http2,
    /// TCP, TLS, HTTPS, MongoDB, Redis, MySQL: opaque to the proxy.
    Tcp,
    Udp,
    /// No protocol given: Istio sniffs the first bytes, as the proxy's `auto` does.
    Unknown,
}

impl Protocol {
    /// Istio's rule: `appProtocol`, else the port name's prefix before `-` (`http-web`, `grpc`).
    pub fn from_name(name: &str) -> Protocol {
        let prefix = name.split('-').next().unwrap_or_default().to_ascii_lowercase();
        match prefix.as_str() {
            "http" | "http1" => Protocol::Http,
            "http2" | "grpc" | "grpc-web" | "h2c" => Protocol::Http2,
            "tcp" | "tls" | "https" | "mongo" | "redis" | "mysql" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => Protocol::Unknown,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    /// The service port's name; endpoints name their ports by it.
    pub name: String,
    pub number: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceSource {
    Kubernetes,
    ServiceEntry,
}

/// A service as the proxies see it: a host name, ports, addresses that reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    /// The FQDN (`reviews.default.svc.cluster.local`) or the ServiceEntry's host.
    pub hostname: String,
    pub namespace: String,
    /// The Kubernetes name (`reviews`); for a ServiceEntry its host.
    pub name: String,
    pub source: ServiceSource,
    /// The ClusterIP(s), or the ServiceEntry's `addresses` that are single IPs.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<Port>,
    /// Namespaces this service is visible in (`*` all, `.` its own); empty means all.
    pub export_to: Vec<String>,
    /// The object it comes from.
    pub origin: Key,
}

impl Service {
    pub fn port(&self, number: u16) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Whether a proxy in `namespace` may see this service.
    pub fn visible_in(&self, namespace: &str) -> bool {
        visible(&self.export_to, &self.namespace, namespace)
    }
}

/// Istio's `exportTo` rule: empty or `*` everywhere, `.` the object's own namespace, else by name.
pub fn visible(export_to: &[String], own: &str, viewer: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|e| e == "*" || (e == "." && own == viewer) || e == viewer)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Ready,
    /// Not ready (or terminating): known, shown in `/debug/endpointz`, never served.
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Endpoint {
    pub address: IpAddr,
    /// Service port name → the endpoint's port.
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub health: Health,
    /// The Pod or WorkloadEntry behind it, when known.
    pub workload: Option<String>,
}

/// An endpoint that is known but cannot be served yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HeldBack {
    pub service: String,
    pub address: String,
    pub reason: String,
}

/// Services by host name, each with its endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Registry {
    pub services: BTreeMap<String, Service>,
    pub endpoints: BTreeMap<String, Vec<Endpoint>>,
    pub held_back: Vec<HeldBack>,
}

impl Registry {
    /// Services only (the config view): Kubernetes Services and ServiceEntries.
    pub fn services(store: &Store, domain: &str) -> BTreeMap<String, Service> {
        let mut out = BTreeMap::new();
        for obj in store.of_kind(Kind::Service) {
            let Body::Service(spec) = &obj.body else { continue };
            let svc = kube_service(obj, spec, domain);
            out.insert(svc.hostname.clone(), svc);
        }
        for obj in store.of_kind(Kind::ServiceEntry) {
            let Body::ServiceEntry(se) = &obj.body else { continue };
            for svc in entry_services(obj, se) {
                // A Kubernetes Service of the same name wins, as in Istio.
                out.entry(svc.hostname.clone()).or_insert(svc);
            }
        }
        out
    }

    /// Services and their endpoints.
    pub fn build(store: &Store, domain: &str) -> Registry {
        let services = Self::services(store, domain);
        let mut reg = Registry { services, ..Default::default() };
        reg.endpoints = reg.services.keys().map(|h| (h.clone(), Vec::new())).collect();
        let pods = pods_by_name(store);

        // EndpointSlices, joined to their Pods.
        let mut sliced: BTreeSet<String> = BTreeSet::new();
        for obj in store.of_kind(Kind::EndpointSlice) {
            let Body::EndpointSlice(slice) = &obj.body else { continue };
            let Some(svc_name) = obj.meta.labels.get(SERVICE_NAME_LABEL) else { continue };
            let hostname = format!("{svc_name}.{}.svc.{domain}", obj.meta.key.namespace);
            if !reg.services.contains_key(&hostname) {
                continue;
            }
            sliced.insert(hostname.clone());
            let ports: Vec<(String, u16)> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| Some((p.name.clone().unwrap_or_default(), u16::try_from(p.port?).ok()?)))
                .collect();
            for ep in &slice.endpoints {
                let c = ep.conditions.clone().unwrap_or_default();
                // Kubernetes: a nil `ready` means ready; a terminating endpoint is not served.
                let ready = c.ready.unwrap_or(true) && !c.terminating.unwrap_or(false);
                let (labels, workload) = match &ep.target_ref {
                    Some(r) if r.kind.as_deref() == Some("Pod") => {
                        let ns = r.namespace.clone().unwrap_or_else(|| obj.meta.key.namespace.clone());
                        let name = r.name.clone().unwrap_or_default();
                        match pods.get(&(ns.as_str(), name.as_str())) {
                            Some(pod) => (pod.meta.labels.clone(), Some(format!("{name}.{ns}"))),
                            None => {
                                for a in &ep.addresses {
                                    reg.held_back.push(HeldBack {
                                        service: hostname.clone(),
                                        address: a.clone(),
                                        reason: format!(
                                            "Pod {ns}/{name} has not been seen yet (its labels select subsets)"
                                        ),
                                    });
                                }
                                continue;
                            }
                        }
                    }
                    _ => (BTreeMap::new(), None),
                };
                for a in &ep.addresses {
                    let Ok(address) = a.parse::<IpAddr>() else { continue };
                    let ep = Endpoint {
                        address,
                        ports: ports.iter().cloned().collect(),
                        labels: labels.clone(),
                        health: if ready { Health::Ready } else { Health::NotReady },
                        workload: workload.clone(),
                    };
                    reg.endpoints.entry(hostname.clone()).or_default().push(ep);
                }
            }
        }

        // A Service without any EndpointSlice: the ready Pods its selector picks, as the
        // EndpointSlice controller would list them.
        for obj in store.of_kind(Kind::Service) {
            let Body::Service(spec) = &obj.body else { continue };
            let hostname = format!("{}.{}.svc.{domain}", obj.meta.key.name, obj.meta.key.namespace);
            let Some(selector) = spec.selector.as_ref().filter(|s| !s.is_empty()) else { continue };
            if sliced.contains(&hostname) {
                continue;
            }
            let ports = spec.ports.clone().unwrap_or_default();
            for pod in store.of_kind(Kind::Pod) {
                let Body::Pod(p) = &pod.body else { continue };
                if pod.meta.key.namespace != obj.meta.key.namespace || !selects(selector, &pod.meta.labels) {
                    continue;
                }
                let Some(address) = pod_ip(p) else { continue };
                let mut eports = BTreeMap::new();
                for sp in &ports {
                    if let Some(port) = target_port(sp, p) {
                        eports.insert(sp.name.clone().unwrap_or_default(), port);
                    }
                }
                reg.endpoints.entry(hostname.clone()).or_default().push(Endpoint {
                    address,
                    ports: eports,
                    labels: pod.meta.labels.clone(),
                    health: if pod_ready(p) { Health::Ready } else { Health::NotReady },
                    workload: Some(format!("{}.{}", pod.meta.key.name, pod.meta.key.namespace)),
                });
            }
        }

        // ServiceEntry endpoints: inline, or the WorkloadEntries its selector picks.
        for obj in store.of_kind(Kind::ServiceEntry) {
            let Body::ServiceEntry(se) = &obj.body else { continue };
            let mut eps = Vec::new();
            for we in &se.endpoints {
                if let Some(e) = entry_endpoint(we, &se.ports, None) {
                    eps.push(e);
                }
            }
            if let Some(sel) = &se.workload_selector {
                for w in store.of_kind(Kind::WorkloadEntry) {
                    let Body::WorkloadEntry(we) = &w.body else { continue };
                    if w.meta.key.namespace == obj.meta.key.namespace && selects(&sel.labels, &we.labels) {
                        let name = format!("{}.{}", w.meta.key.name, w.meta.key.namespace);
                        eps.extend(entry_endpoint(we, &se.ports, Some(name)));
                    }
                }
            }
            for host in &se.hosts {
                if reg.services.get(host).is_some_and(|s| s.origin == obj.meta.key) {
                    reg.endpoints.entry(host.clone()).or_default().extend(eps.iter().cloned());
                }
            }
        }
        for eps in reg.endpoints.values_mut() {
            eps.sort();
            eps.dedup_by(|a, b| a.address == b.address && a.ports == b.ports);
        }
        reg
    }
}

fn kube_service(obj: &Object, spec: &core::ServiceSpec, domain: &str) -> Service {
    let key = &obj.meta.key;
    let addresses = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .iter()
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let name = p.name.clone().unwrap_or_default();
            let protocol = match (p.protocol.as_deref(), p.app_protocol.as_deref()) {
                (Some("UDP"), _) => Protocol::Udp,
                (_, Some(app)) => Protocol::from_name(app),
                _ => Protocol::from_name(&name),
            };
            Some(Port { name, number: u16::try_from(p.port).ok()?, protocol })
        })
        .collect();
    let export_to = obj
        .meta
        .annotations
        .get(EXPORT_TO_ANNOTATION)
        .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    Service {
        hostname: format!("{}.{}.svc.{domain}", key.name, key.namespace),
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        source: ServiceSource::Kubernetes,
        addresses,
        ports,
        export_to,
        origin: key.clone(),
    }
}

fn entry_services(obj: &Object, se: &istio::ServiceEntry) -> Vec<Service> {
    let addresses: Vec<IpAddr> = se.addresses.iter().filter_map(|a| a.parse().ok()).collect();
    let ports: Vec<Port> = se
        .ports
        .iter()
        .filter_map(|p| {
            let protocol = Protocol::from_name(p.protocol.as_deref().unwrap_or(&p.name));
            Some(Port { name: p.name.clone(), number: u16::try_from(p.number).ok()?, protocol })
        })
        .collect();
    se.hosts
        .iter()
        .map(|h| Service {
            hostname: h.to_ascii_lowercase(),
            namespace: obj.meta.key.namespace.clone(),
            name: h.to_ascii_lowercase(),
            source: ServiceSource::ServiceEntry,
            addresses: addresses.clone(),
            ports: ports.clone(),
            export_to: se.export_to.clone(),
            origin: obj.meta.key.clone(),
        })
        .collect()
}

/// A ServiceEntry endpoint; its port per service port is `ports[name]`, else the `targetPort`,
/// else the port's number (Istio's rule). An endpoint without an IP address is skipped (DNS
/// names need a resolver the proxy does not have; the translation reports them).
fn entry_endpoint(
    we: &istio::WorkloadEntry,
    ports: &[istio::ServicePort],
    workload: Option<String>,
) -> Option<Endpoint> {
    let address = we.address.as_deref()?.parse().ok()?;
    let ports = ports
        .iter()
        .filter_map(|p| {
            let n = we.ports.get(&p.name).copied().or(p.target_port).unwrap_or(p.number);
            Some((p.name.clone(), u16::try_from(n).ok()?))
        })
        .collect();
    Some(Endpoint { address, ports, labels: we.labels.clone(), health: Health::Ready, workload })
}

fn pods_by_name(store: &Store) -> HashMap<(&str, &str), &Arc<Object>> {
    store.of_kind(Kind::Pod).map(|p| ((p.meta.key.namespace.as_str(), p.meta.key.name.as_str()), p)).collect()
}

/// A label selector (equality only, as Service selectors and subsets are).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn pod_ip(pod: &core::Pod) -> Option<IpAddr> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// Ready unless its `Ready` condition says otherwise (a hand-written Pod often has no conditions).
fn pod_ready(pod: &core::Pod) -> bool {
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    !conditions.into_iter().flatten().any(|c| c.type_ == "Ready" && c.status != "True")
        && pod.metadata.deletion_timestamp.is_none()
}

/// A Service port's `targetPort` on a Pod: a number, or a container port's name.
fn target_port(sp: &core::ServicePort, pod: &core::Pod) -> Option<u16> {
    match &sp.target_port {
        None => u16::try_from(sp.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

//! DestinationRules → clusters. Every field of a DestinationRule is translated or reported here.
//!
//! Several DestinationRules for one host are merged as Istio merges them: the subsets of all (a
//! subset name defined twice is a conflict, the older definition wins), the traffic policy of the
//! oldest rule that has one. Each section (`loadBalancer`, `connectionPool`, `outlierDetection`) is
//! taken whole from the most specific place that sets it: the subset's port-level settings, the
//! subset's policy, the rule's port-level settings, the rule's policy.
//! `exportTo` on a DestinationRule is not honoured (every rule applies mesh-wide) and is reported.
//! Not carried yet (reported): `connectionPool.http.maxRetries`.

use std::collections::{BTreeMap, HashMap};

use mesh_proxy::config::{
    LbPolicy, RawCircuitBreakers, RawCluster, RawConsistentHash, RawHttpCookie, RawMaglev, RawOutlierDetection,
    RawRingHash, RawTcpKeepalive,
};

use super::{age_order, cluster_name, resolve_host, ClusterOut, EdsKey, Options};
use crate::{
    analysis::{Code, Findings},
    istio::{ConnectionPool, ConsistentHash, LoadBalancer, OutlierDetection, Subset, TrafficPolicy},
    model::{self, Health, Registry, Store},
    resource::{Body, Kind, Meta, Object},
};

/// A subset as merged: its definition and the rule it comes from.
struct MergedSubset<'a> {
    subset: &'a Subset,
    index: usize,
    rule: &'a Object,
}

/// One place a setting may come from (a policy, or its port-level settings for the port).
#[derive(Clone, Copy)]
struct Layer<'a> {
    lb: Option<&'a LoadBalancer>,
    pool: Option<&'a ConnectionPool>,
    outlier: Option<&'a OutlierDetection>,
}

/// Every service's clusters, and each host's subsets (name → labels).
#[allow(clippy::type_complexity)]
pub(super) fn service_clusters(
    store: &Store,
    registry: &Registry,
    opts: &Options,
    f: &mut Findings,
) -> (BTreeMap<String, Vec<ClusterOut>>, HashMap<String, BTreeMap<String, BTreeMap<String, String>>>) {
    let mut rules: Vec<&Object> = store.of_kind(Kind::DestinationRule).map(|o| &**o).collect();
    rules.sort_by(|a, b| age_order(a, b));
    let mut by_host: HashMap<String, Vec<&Object>> = HashMap::new();
    for dr in rules {
        let Body::DestinationRule(spec) = &dr.body else { continue };
        report_rule(dr, f);
        let host = resolve_host(&spec.host, &dr.meta.key.namespace, &opts.domain);
        if !registry.services.contains_key(&host) {
            f.add(
                Code::ReferencedResourceNotFound,
                &dr.meta,
                "spec.host",
                format!("Referenced host not found: {:?}", spec.host),
            );
            continue;
        }
        by_host.entry(host).or_default().push(dr);
    }

    let mut clusters = BTreeMap::new();
    let mut subsets_by_host = HashMap::new();
    for svc in registry.services.values() {
        let drs = by_host.get(&svc.hostname).map(Vec::as_slice).unwrap_or_default();
        let mut subsets: Vec<MergedSubset> = Vec::new();
        for dr in drs {
            let Body::DestinationRule(spec) = &dr.body else { continue };
            for (i, s) in spec.subsets.iter().enumerate() {
                if let Some(first) = subsets.iter().find(|m| m.subset.name == s.name) {
                    let msg = format!(
                        "subset {:?} of {} is also defined by {}; that one applies",
                        s.name, svc.hostname, first.rule.meta.key
                    );
                    f.add(Code::ConflictingSubsets, &dr.meta, format!("spec.subsets[{i}].name"), msg);
                    continue;
                }
                subsets.push(MergedSubset { subset: s, index: i, rule: dr });
            }
        }
        // The oldest traffic policy (a later rule's applies when the older ones have none).
        let top = drs.iter().find_map(|dr| match &dr.body {
            Body::DestinationRule(spec) => spec.traffic_policy.as_ref(),
            _ => None,
        });
        let mut out = Vec::new();
        for port in &svc.ports {
            let mut base = Vec::new();
            if let Some(tp) = top {
                push_policy(&mut base, tp, port.number);
            }
            out.push(cluster(
                &cluster_name(port.number, "", &svc.hostname),
                &base,
                EdsKey { hostname: svc.hostname.clone(), port: port.number, labels: BTreeMap::new() },
            ));
            for m in &subsets {
                let mut layers = base.clone();
                if let Some(tp) = &m.subset.traffic_policy {
                    push_policy(&mut layers, tp, port.number);
                }
                out.push(cluster(
                    &cluster_name(port.number, &m.subset.name, &svc.hostname),
                    &layers,
                    EdsKey { hostname: svc.hostname.clone(), port: port.number, labels: m.subset.labels.clone() },
                ));
            }
        }
        // A subset no ready endpoint carries the labels of: every request to it gets 503.
        for m in &subsets {
            let any = registry
                .endpoints
                .get(&svc.hostname)
                .into_iter()
                .flatten()
                .any(|e| e.health == Health::Ready && model::selects(&m.subset.labels, &e.labels));
            if !any {
                let msg = format!(
                    "subset {:?} selects no ready endpoint of {} (labels {:?}): requests routed to it get 503",
                    m.subset.name, svc.hostname, m.subset.labels
                );
                f.add(Code::SubsetSelectsNoEndpoints, &m.rule.meta, format!("spec.subsets[{}].labels", m.index), msg);
            }
        }
        subsets_by_host.insert(
            svc.hostname.clone(),
            subsets.iter().map(|m| (m.subset.name.clone(), m.subset.labels.clone())).collect(),
        );
        clusters.insert(svc.hostname.clone(), out);
    }
    (clusters, subsets_by_host)
}

/// Fields of a DestinationRule the proxy cannot carry, reported once per rule.
fn report_rule(dr: &Object, f: &mut Findings) {
    let Body::DestinationRule(spec) = &dr.body else { return };
    let meta = &dr.meta;
    f.not_carried(meta, "spec", &spec.other);
    if !spec.export_to.is_empty() {
        let msg = "exportTo on a DestinationRule is not honoured: the rule applies in every namespace";
        f.add(Code::NotCarriedByProxy, meta, "spec.exportTo", msg);
    }
    let mut policies: Vec<(String, &TrafficPolicy)> = Vec::new();
    if let Some(tp) = &spec.traffic_policy {
        policies.push(("spec.trafficPolicy".into(), tp));
    }
    for (i, s) in spec.subsets.iter().enumerate() {
        f.not_carried(meta, &format!("spec.subsets[{i}]"), &s.other);
        if let Some(tp) = &s.traffic_policy {
            policies.push((format!("spec.subsets[{i}].trafficPolicy"), tp));
        }
    }
    for (path, tp) in policies {
        f.not_carried(meta, &path, &tp.other);
        report_settings(meta, &path, tp.load_balancer.as_ref(), tp.connection_pool.as_ref(), f);
        report_outlier(meta, &path, tp.outlier_detection.as_ref(), f);
        for (j, pl) in tp.port_level_settings.iter().enumerate() {
            let p = format!("{path}.portLevelSettings[{j}]");
            f.not_carried(meta, &p, &pl.other);
            if let Some(sel) = &pl.port {
                f.not_carried(meta, &format!("{p}.port"), &sel.other);
            }
            report_settings(meta, &p, pl.load_balancer.as_ref(), pl.connection_pool.as_ref(), f);
            report_outlier(meta, &p, pl.outlier_detection.as_ref(), f);
        }
    }
}

fn report_settings(
    meta: &Meta,
    path: &str,
    lb: Option<&LoadBalancer>,
    pool: Option<&ConnectionPool>,
    f: &mut Findings,
) {
    if let Some(lb) = lb {
        f.not_carried(meta, &format!("{path}.loadBalancer"), &lb.other);
        if let Some(simple) = &lb.simple {
            if let Err(msg) = lb_policy(simple) {
                f.add(msg.0, meta, format!("{path}.loadBalancer.simple"), msg.1);
            }
        }
        if let Some(h) = &lb.consistent_hash {
            let hpath = format!("{path}.loadBalancer.consistentHash");
            f.not_carried(meta, &hpath, &h.other);
            if let Some(c) = &h.http_cookie {
                f.not_carried(meta, &format!("{hpath}.httpCookie"), &c.other);
            }
            if let Some(r) = &h.ring_hash {
                f.not_carried(meta, &format!("{hpath}.ringHash"), &r.other);
            }
            if let Some(m) = &h.maglev {
                f.not_carried(meta, &format!("{hpath}.maglev"), &m.other);
            }
        }
    }
    if let Some(pool) = pool {
        f.not_carried(meta, &format!("{path}.connectionPool"), &pool.other);
        if let Some(tcp) = &pool.tcp {
            f.not_carried(meta, &format!("{path}.connectionPool.tcp"), &tcp.other);
            if let Some(t) = &tcp.connect_timeout {
                if let Err(e) = mesh_proxy::parse::duration(t) {
                    f.add(Code::SchemaValidationError, meta, format!("{path}.connectionPool.tcp.connectTimeout"), e);
                }
            }
            if let Some(k) = &tcp.tcp_keepalive {
                f.not_carried(meta, &format!("{path}.connectionPool.tcp.tcpKeepalive"), &k.other);
            }
        }
        if let Some(http) = &pool.http {
            // `maxRetries` bounds retries in flight: this build of mesh-proxy refuses it.
            f.not_carried(meta, &format!("{path}.connectionPool.http"), &http.other);
        }
    }
}

fn report_outlier(meta: &Meta, path: &str, od: Option<&OutlierDetection>, f: &mut Findings) {
    if let Some(od) = od {
        f.not_carried(meta, &format!("{path}.outlierDetection"), &od.other);
    }
}

/// An Istio limit: 0 (or less) means "unlimited", which the proxy reads as the field left out.
fn limit(v: Option<i64>) -> Option<u32> {
    v.filter(|n| *n > 0).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Adds a traffic policy and, above it, its port-level settings for `port`.
fn push_policy<'a>(layers: &mut Vec<Layer<'a>>, tp: &'a TrafficPolicy, port: u16) {
    layers.push(Layer {
        lb: tp.load_balancer.as_ref(),
        pool: tp.connection_pool.as_ref(),
        outlier: tp.outlier_detection.as_ref(),
    });
    for pl in &tp.port_level_settings {
        if pl.port.as_ref().and_then(|p| p.number) == Some(u32::from(port)) {
            layers.push(Layer {
                lb: pl.load_balancer.as_ref(),
                pool: pl.connection_pool.as_ref(),
                outlier: pl.outlier_detection.as_ref(),
            });
        }
    }
}

/// A cluster from its policy layers, least specific first.
fn cluster(name: &str, layers: &[Layer], eds: EdsKey) -> ClusterOut {
    let mut c = RawCluster { name: name.to_string(), ..Default::default() };
    let mut cb = RawCircuitBreakers::default();
    // Each section is taken whole from the most specific layer that has it (Istio's merge: fields
    // a more specific section leaves out get their defaults, not the outer section's values).
    let lb = layers.iter().rev().find_map(|l| l.lb);
    let pool = layers.iter().rev().find_map(|l| l.pool);
    let outlier = layers.iter().rev().find_map(|l| l.outlier);
    if let Some(Ok(p)) = lb.and_then(|lb| lb.simple.as_deref()).map(lb_policy) {
        c.lb_policy = p;
    }
    // `simple` and `consistentHash` are one choice: the proxy refuses both.
    if let Some(h) = lb.and_then(|lb| lb.consistent_hash.as_ref()) {
        c.lb_policy = LbPolicy::default();
        c.consistent_hash = Some(consistent_hash(h));
    }
    // Durations are passed as written: a value the proxy refuses is its NACK, and analysis reports it.
    if let Some(tcp) = pool.and_then(|p| p.tcp.as_ref()) {
        c.connect_timeout = tcp.connect_timeout.clone();
        cb.max_connections = limit(tcp.max_connections);
        c.tcp_keepalive = tcp.tcp_keepalive.as_ref().map(|k| RawTcpKeepalive {
            probes: k.probes,
            time: k.time.clone(),
            interval: k.interval.clone(),
        });
    }
    if let Some(http) = pool.and_then(|p| p.http.as_ref()) {
        cb.max_pending_requests = limit(http.http1_max_pending_requests);
        cb.max_requests = limit(http.http2_max_requests);
        c.max_requests_per_connection = limit(http.max_requests_per_connection);
        c.idle_timeout = http.idle_timeout.clone();
    }
    if let Some(od) = outlier {
        c.outlier_detection = Some(RawOutlierDetection {
            consecutive_5xx_errors: od.consecutive_5xx_errors,
            consecutive_gateway_errors: od.consecutive_gateway_errors.or(od.consecutive_errors),
            interval: od.interval.clone(),
            base_ejection_time: od.base_ejection_time.clone(),
            max_ejection_percent: od.max_ejection_percent,
            min_health_percent: od.min_health_percent,
        });
    }
    if cb != RawCircuitBreakers::default() {
        c.circuit_breakers = Some(cb);
    }
    // A passthrough cluster forwards to the address the application dialled: the proxy refuses
    // endpoints for it, so it has no EDS entry.
    let eds = (c.lb_policy != LbPolicy::Passthrough).then_some(eds);
    ClusterOut { cluster: c, eds }
}

/// Istio's `consistentHash`, field by field (an httpCookie without ttl is read, never issued).
fn consistent_hash(h: &ConsistentHash) -> RawConsistentHash {
    let ring_size = h.ring_hash.as_ref().and_then(|r| r.minimum_ring_size).or(h.minimum_ring_size);
    RawConsistentHash {
        http_header_name: h.http_header_name.clone(),
        http_cookie: h.http_cookie.as_ref().map(|c| RawHttpCookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.clone(),
        }),
        use_source_ip: h.use_source_ip,
        http_query_parameter_name: h.http_query_parameter_name.clone(),
        ring_hash: ring_size.map(|n| RawRingHash { minimum_ring_size: Some(n) }),
        maglev: h.maglev.as_ref().map(|m| RawMaglev { table_size: m.table_size }),
    }
}

/// Istio's `loadBalancer.simple` → the proxy's balancer.
fn lb_policy(simple: &str) -> Result<LbPolicy, (Code, String)> {
    match simple {
        "UNSPECIFIED" | "ROUND_ROBIN" => Ok(LbPolicy::RoundRobin),
        "LEAST_REQUEST" | "LEAST_CONN" => Ok(LbPolicy::LeastRequest),
        "RANDOM" => Ok(LbPolicy::Random),
        "PASSTHROUGH" => Ok(LbPolicy::Passthrough),
        other => Err((
            Code::SchemaValidationError,
            format!("{other:?} is not a load balancer: expected ROUND_ROBIN, LEAST_REQUEST, LEAST_CONN, RANDOM or PASSTHROUGH"),
        )),
    }
}

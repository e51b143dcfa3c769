//! Proxy status: who polls, what each was sent, what each applied or rejected, and Istio's
//! `proxy-status` table made from it (`mesh-pilot status`).
//!
//! A proxy names itself in every request (`X-Mesh-Node: name.namespace`) and reports the result of
//! its previous update: `X-Mesh-Applied: <listeners> <routes> <clusters> <endpoints>` (the versions
//! in force, `-` for a type it does not take from discovery) and, when its last update was refused,
//! `X-Mesh-Rejected` (the versions it refused) with `X-Mesh-Error` (why). Per type, as
//! istioctl reports it: **SYNCED** the proxy applied what it was last sent; **NOT SENT** nothing
//! was sent; **STALE** sent but not (yet) applied; **ERROR** the last thing sent was rejected.

use std::{
    collections::HashMap,
    fmt::Write,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    metrics::{Metrics, TypeLabels},
    snapshot::Type,
};

/// The protocol's headers are the proxy's client's, defined once there.
pub use mesh_proxy::control::discovery::headers::{
    APPLIED as APPLIED_HEADER, ERROR as ERROR_HEADER, NODE as NODE_HEADER, REJECTED as REJECTED_HEADER,
};

/// A proxy that has not polled for this long is forgotten (it went away).
pub const FORGET_AFTER: Duration = Duration::from_secs(180);

/// Per type: the version sent, applied, rejected.
type Versions = [Option<String>; 4];

#[derive(Debug, Clone)]
struct Node {
    scope: String,
    address: String,
    last_seen: Instant,
    /// Long polls of this proxy held open now.
    waiting: u32,
    sent: Versions,
    applied: Versions,
    rejected: Versions,
    error: Option<String>,
}

/// What a request reports about its proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub node: String,
    pub applied: Option<Versions>,
    pub rejected: Option<(Versions, String)>,
}

impl Report {
    /// From request headers; `None` when the request does not name its proxy.
    pub fn from_headers(h: &http::HeaderMap) -> Option<Report> {
        let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
        let node = get(NODE_HEADER).filter(|n| !n.is_empty())?.to_string();
        let rejected = get(REJECTED_HEADER)
            .and_then(parse_versions)
            .map(|v| (v, get(ERROR_HEADER).unwrap_or("rejected without a reason").to_string()));
        Some(Report { node, applied: get(APPLIED_HEADER).and_then(parse_versions), rejected })
    }
}

fn parse_versions(s: &str) -> Option<Versions> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [l, r, c, e] = parts.as_slice() else { return None };
    let v = |x: &&str| (*x != "-").then(|| x.to_string());
    Some([v(l), v(r), v(c), v(e)])
}

/// Formats versions for the headers (`-` for none).
pub fn format_versions(v: &[Option<String>; 4]) -> String {
    v.iter().map(|x| x.as_deref().unwrap_or("-")).collect::<Vec<_>>().join(" ")
}

/// One row of `/debug/syncz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    pub node: String,
    pub scope: String,
    pub address: String,
    pub last_seen_ms: u64,
    pub waiting: u32,
    /// Per type, in `listeners routes clusters endpoints` order.
    pub types: Vec<TypeSync>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeSync {
    pub r#type: String,
    pub status: String,
    pub sent: Option<String>,
    pub applied: Option<String>,
}

#[derive(Debug, Default)]
pub struct Tracker {
    nodes: Mutex<HashMap<String, Node>>,
}

impl Tracker {
    /// Records a request: who, from where, and what it reports.
    pub fn seen(&self, report: &Report, scope: &str, address: &str, metrics: &Metrics) {
        let mut nodes = self.nodes.lock().expect("status lock");
        let n = nodes.entry(report.node.clone()).or_insert_with(|| Node {
            scope: scope.to_string(),
            address: address.to_string(),
            last_seen: Instant::now(),
            waiting: 0,
            sent: Default::default(),
            applied: Default::default(),
            rejected: Default::default(),
            error: None,
        });
        n.scope = scope.to_string();
        n.address = address.to_string();
        n.last_seen = Instant::now();
        if let Some(applied) = &report.applied {
            n.applied = applied.clone();
        }
        match &report.rejected {
            Some((versions, error)) => {
                let new = n.rejected != *versions || n.error.as_deref() != Some(error);
                if new {
                    for t in Type::ALL {
                        let i = t.index();
                        if versions[i].is_some() && versions[i] != n.applied[i] {
                            metrics.nacks.get_or_create(&TypeLabels { r#type: t.as_str().into() }).inc();
                        }
                    }
                }
                n.rejected = versions.clone();
                n.error = Some(error.clone());
            }
            None => {
                n.rejected = Default::default();
                n.error = None;
            }
        }
    }

    pub fn sent(&self, node: &str, t: Type, version: &str) {
        if let Some(n) = self.nodes.lock().expect("status lock").get_mut(node) {
            n.sent[t.index()] = Some(version.to_string());
        }
    }

    /// A long poll of `node` starts (`+1`) or ends (`-1`).
    pub fn waiting(&self, node: &str, delta: i32) {
        if let Some(n) = self.nodes.lock().expect("status lock").get_mut(node) {
            n.waiting = n.waiting.saturating_add_signed(delta);
        }
    }

    /// The version `node` was last sent of type `t`.
    pub fn last_sent(&self, node: &str, t: Type) -> Option<String> {
        self.nodes.lock().expect("status lock").get(node).and_then(|n| n.sent[t.index()].clone())
    }

    /// Forgets proxies gone silent; returns how many are connected (polled within `recent`).
    pub fn sweep(&self, recent: Duration) -> usize {
        let mut nodes = self.nodes.lock().expect("status lock");
        nodes.retain(|_, n| n.last_seen.elapsed() < FORGET_AFTER);
        nodes.values().filter(|n| n.waiting > 0 || n.last_seen.elapsed() < recent).count()
    }

    pub fn syncz(&self) -> Vec<Sync> {
        let nodes = self.nodes.lock().expect("status lock");
        let mut out: Vec<Sync> = nodes
            .iter()
            .map(|(name, n)| Sync {
                node: name.clone(),
                scope: n.scope.clone(),
                address: n.address.clone(),
                last_seen_ms: n.last_seen.elapsed().as_millis() as u64,
                waiting: n.waiting,
                types: Type::ALL
                    .iter()
                    .map(|t| {
                        let i = t.index();
                        TypeSync {
                            r#type: t.as_str().into(),
                            status: type_status(&n.sent[i], &n.applied[i], &n.rejected[i]).into(),
                            sent: n.sent[i].clone(),
                            applied: n.applied[i].clone(),
                        }
                    })
                    .collect(),
                error: n.error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

fn type_status(sent: &Option<String>, applied: &Option<String>, rejected: &Option<String>) -> &'static str {
    match (sent, applied, rejected) {
        // Rejected what it was sent (a type that did not change rides along in a rejected
        // update: it is not the one in error).
        (Some(s), a, Some(r)) if s == r && a.as_ref() != Some(r) => "ERROR",
        (None, _, _) => "NOT SENT",
        (Some(s), Some(a), _) if s == a => "SYNCED",
        _ => "STALE",
    }
}

/// Istio's `proxy-status` table, then one line per rejection with its reason.
pub fn table(rows: &[Sync], pilot: &str) -> String {
    let mut out = String::new();
    let name_w = rows.iter().map(|r| r.node.len()).max().unwrap_or(0).max(4) + 3;
    let scope_w = rows.iter().map(|r| r.scope.len()).max().unwrap_or(0).max(5) + 3;
    let col = |s: &str| format!("{s:<12}");
    let _ = write!(out, "{:<name_w$}{:<scope_w$}", "NAME", "SCOPE");
    for t in ["CDS", "LDS", "EDS", "RDS"] {
        out.push_str(&col(t));
    }
    let _ = writeln!(out, "PILOT");
    let order = [Type::Clusters, Type::Listeners, Type::Endpoints, Type::Routes];
    for r in rows {
        let _ = write!(out, "{:<name_w$}{:<scope_w$}", r.node, r.scope);
        for t in order {
            let status = r.types.get(t.index()).map_or("NOT SENT", |s| s.status.as_str());
            out.push_str(&col(status));
        }
        let _ = writeln!(out, "{pilot}");
    }
    for r in rows {
        if let Some(e) = &r.error {
            if r.types.iter().any(|t| t.status == "ERROR") {
                let types: Vec<&str> = order
                    .iter()
                    .filter(|t| r.types.get(t.index()).is_some_and(|s| s.status == "ERROR"))
                    .map(|t| t.xds())
                    .collect();
                let _ = writeln!(out, "\n{} ({}) NACK: {e}", r.node, types.join(", "));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn statuses_follow_istio() {
        assert_eq!(type_status(&None, &None, &None), "NOT SENT");
        assert_eq!(type_status(&v("a"), &v("a"), &None), "SYNCED");
        assert_eq!(type_status(&v("b"), &v("a"), &None), "STALE");
        assert_eq!(type_status(&v("b"), &v("a"), &v("b")), "ERROR");
        // Rejected an older version, then sent a newer one: waiting for its answer.
        assert_eq!(type_status(&v("c"), &v("a"), &v("b")), "STALE");
    }

    #[test]
    fn reports_and_table() {
        let mut h = http::HeaderMap::new();
        h.insert(NODE_HEADER, "productpage-v1.default".parse().unwrap());
        h.insert(APPLIED_HEADER, "l1 r1 c1 e1".parse().unwrap());
        h.insert(REJECTED_HEADER, "l1 r2 c1 e1".parse().unwrap());
        h.insert(ERROR_HEADER, "routes[0].rules[0].timeout: invalid duration".parse().unwrap());
        let report = Report::from_headers(&h).unwrap();
        let m = Metrics::default();
        let t = Tracker::default();
        t.seen(&report, "default", "10.0.0.1:5000", &m);
        for (ty, ver) in
            [(Type::Listeners, "l1"), (Type::Routes, "r2"), (Type::Clusters, "c1"), (Type::Endpoints, "e1")]
        {
            t.sent("productpage-v1.default", ty, ver);
        }
        let rows = t.syncz();
        let out = table(&rows, "mesh-pilot");
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("NAME"), "{out}");
        let cols: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(cols, ["productpage-v1.default", "default", "SYNCED", "SYNCED", "SYNCED", "ERROR", "mesh-pilot"]);
        assert!(
            out.contains("productpage-v1.default (RDS) NACK: routes[0].rules[0].timeout: invalid duration"),
            "{out}"
        );
        assert_eq!(m.nacks.get_or_create(&TypeLabels { r#type: "routes".into() }).get(), 1);
    }
}

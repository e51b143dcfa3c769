//! What the discovery server hands out: per namespace scope, an immutable [`Snapshot`] of the four
//! types, rendered once and shared by every proxy of the scope (and by every scope whose config is
//! identical).
//!
//! A snapshot is a config [`View`] (listeners, routes, clusters: rebuilt after the config
//! debounce) plus an [`EdsTable`] (every cluster's endpoints: replaced at once on an endpoint
//! change, copy-on-write, so older snapshots keep theirs). Versions are content hashes for the
//! config types and `clusters-boot-seq` for endpoints (`clusters` a hash of the cluster list,
//! `seq` the last endpoint change that touched one of them): an endpoint change only moves the
//! scopes it concerns, and a route change leaves the endpoints' version alone.
//!
//! Endpoint deltas: a proxy that has endpoints version `view.boot-N` of the current view may be
//! sent only the clusters changed since `N` (the table keeps a log of recent changes); that keeps
//! one endpoint change among thousands of clusters cheap for thousands of proxies.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, OnceLock},
    time::Instant,
};

use bytes::Bytes;
use mesh_proxy::config::{EndpointsDelta, RawEndpoints};
use serde::Serialize;

use crate::translate::{EdsKey, ScopeConfig};

/// How many endpoint changes the table remembers for deltas; an older proxy gets everything.
const EDS_LOG: usize = 4096;

/// The four resource types, in the order the status table and headers list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Type {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
}

impl Type {
    pub const ALL: [Type; 4] = [Type::Listeners, Type::Routes, Type::Clusters, Type::Endpoints];

    pub fn from_path(s: &str) -> Option<Type> {
        Type::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Type::Listeners => "listeners",
            Type::Routes => "routes",
            Type::Clusters => "clusters",
            Type::Endpoints => "endpoints",
        }
    }

    /// Envoy's name for it, as Istio's proxy-status columns say.
    pub fn xds(self) -> &'static str {
        match self {
            Type::Listeners => "LDS",
            Type::Routes => "RDS",
            Type::Clusters => "CDS",
            Type::Endpoints => "EDS",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// One rendered answer body and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub version: String,
    pub body: Bytes,
}

fn hash_of(v: impl Hash) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn render<T: Serialize>(version: &str, resources: &[T]) -> Bytes {
    #[derive(Serialize)]
    struct Out<'a, T> {
        version_info: &'a str,
        resources: &'a [T],
    }
    Bytes::from(serde_json::to_vec(&Out { version_info: version, resources }).expect("config types serialize"))
}

fn rendered<T: Serialize>(resources: &[T]) -> Rendered {
    let json = serde_json::to_vec(resources).expect("config types serialize");
    let version = hash_of(&json);
    Rendered { body: render(&version, resources), version }
}

/// A scope's config: three rendered types and which endpoints each cluster has.
#[derive(Debug)]
pub struct View {
    /// Hash of everything in the view: equal views are one view.
    pub id: String,
    /// Hash of the clusters and where their endpoints come from: the endpoints' version moves
    /// with it, not with routes (a route change alone leaves the endpoints "SYNCED").
    pub eds_id: String,
    pub listeners: Rendered,
    pub routes: Rendered,
    pub clusters: Rendered,
    /// Cluster name → where its endpoints come from, in the clusters' order.
    pub eds: Vec<(String, Option<EdsKey>)>,
    /// The keys, for "does this endpoint change concern the scope".
    pub keys: HashSet<EdsKey>,
}

impl View {
    pub fn new(cfg: &ScopeConfig) -> View {
        let listeners = rendered(&cfg.listeners);
        let routes = rendered(&cfg.routes);
        let clusters = rendered(&cfg.clusters);
        let eds: Vec<(String, Option<EdsKey>)> =
            cfg.clusters.iter().map(|c| c.name.clone()).zip(cfg.eds.iter().cloned()).collect();
        let id = hash_of((&listeners.version, &routes.version, &clusters.version, &eds));
        let eds_id = hash_of(&eds);
        let keys = eds.iter().filter_map(|(_, k)| k.clone()).collect();
        View { id, eds_id, listeners, routes, clusters, eds, keys }
    }
}

/// One cluster's endpoints at some point, and the change that set them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdsEntry {
    pub seq: u64,
    pub addresses: Arc<Vec<String>>,
}

/// Every cluster's endpoints. Replaced (not mutated) on change: snapshots share it by `Arc`.
#[derive(Debug, Clone, Default)]
pub struct EdsTable {
    /// Distinguishes this process's sequence numbers from a previous run's.
    pub boot: u64,
    pub seq: u64,
    pub entries: HashMap<EdsKey, EdsEntry>,
    /// Recent changes, oldest first, for deltas.
    pub log: VecDeque<(u64, EdsKey)>,
}

impl EdsTable {
    pub fn new(boot: u64) -> EdsTable {
        EdsTable { boot, ..Default::default() }
    }

    /// The table with `updates` applied; only entries whose addresses differ count as changed.
    /// Returns the new table and the keys that changed.
    pub fn with(&self, updates: impl IntoIterator<Item = (EdsKey, Vec<String>)>) -> (EdsTable, Vec<EdsKey>) {
        let mut next = self.clone();
        let mut changed = Vec::new();
        for (key, addresses) in updates {
            if next.entries.get(&key).is_some_and(|e| *e.addresses == addresses) {
                continue;
            }
            if changed.is_empty() {
                next.seq += 1;
            }
            next.entries.insert(key.clone(), EdsEntry { seq: next.seq, addresses: Arc::new(addresses) });
            next.log.push_back((next.seq, key.clone()));
            changed.push(key);
        }
        while next.log.len() > EDS_LOG {
            next.log.pop_front();
        }
        (next, changed)
    }

    /// Keeps only `keys` (after a config build: clusters that no scope has any more go).
    pub fn retain(&mut self, keys: &HashSet<EdsKey>) {
        self.entries.retain(|k, _| keys.contains(k));
    }
}

/// Everything one poll of one scope may read: all four types from one moment.
#[derive(Debug)]
pub struct Snapshot {
    pub view: Arc<View>,
    pub eds: Arc<EdsTable>,
    /// The last endpoint change that touched this view's clusters.
    pub eds_seq: u64,
    pub endpoints_version: String,
    /// `listeners routes clusters endpoints` versions: the snapshot's name in headers.
    pub version: String,
    /// When the oldest change this snapshot is the first to carry happened (push latency).
    pub changed_at: Instant,
    full_endpoints: OnceLock<Bytes>,
}

impl Snapshot {
    pub fn new(view: Arc<View>, eds: Arc<EdsTable>, eds_seq: u64, changed_at: Instant) -> Snapshot {
        let endpoints_version = format!("{}-{:x}-{eds_seq}", &view.eds_id[..8], eds.boot);
        let version = format!(
            "{} {} {} {}",
            view.listeners.version, view.routes.version, view.clusters.version, endpoints_version
        );
        Snapshot { view, eds, eds_seq, endpoints_version, version, changed_at, full_endpoints: OnceLock::new() }
    }

    pub fn type_version(&self, t: Type) -> &str {
        match t {
            Type::Listeners => &self.view.listeners.version,
            Type::Routes => &self.view.routes.version,
            Type::Clusters => &self.view.clusters.version,
            Type::Endpoints => &self.endpoints_version,
        }
    }

    /// The body of a full answer of type `t`.
    pub fn body(&self, t: Type) -> Bytes {
        match t {
            Type::Listeners => self.view.listeners.body.clone(),
            Type::Routes => self.view.routes.body.clone(),
            Type::Clusters => self.view.clusters.body.clone(),
            Type::Endpoints => self.full_endpoints.get_or_init(|| self.render_endpoints(None)).clone(),
        }
    }

    /// Only the clusters changed since the endpoints version `since`, when that is a version of
    /// this view in this run and still in the table's log; `None` means "send everything".
    pub fn endpoints_delta(&self, since: &str) -> Option<Bytes> {
        let prefix = format!("{}-{:x}-", &self.view.eds_id[..8], self.eds.boot);
        let old: u64 = since.strip_prefix(&prefix)?.parse().ok()?;
        if old > self.eds_seq {
            return None;
        }
        // Every change after `old` must still be in the log (the oldest logged change may have
        // lost some of its keys to the bound, so it does not count).
        let oldest_logged = self.eds.log.front().map_or(u64::MAX, |(s, _)| *s);
        if old != self.eds_seq && old < oldest_logged {
            return None;
        }
        let changed: HashSet<&EdsKey> =
            self.eds.log.iter().filter(|(s, k)| *s > old && self.view.keys.contains(k)).map(|(_, k)| k).collect();
        Some(self.render_endpoints(Some((since, &changed))))
    }

    fn render_endpoints(&self, delta: Option<(&str, &HashSet<&EdsKey>)>) -> Bytes {
        let resources: Vec<RawEndpoints> = self
            .view
            .eds
            .iter()
            .filter(|(_, k)| delta.is_none_or(|(_, changed)| k.as_ref().is_some_and(|k| changed.contains(k))))
            .map(|(cluster, key)| RawEndpoints {
                cluster: cluster.clone(),
                addresses: key
                    .as_ref()
                    .and_then(|k| self.eds.entries.get(k))
                    .map(|e| (*e.addresses).clone())
                    .unwrap_or_default(),
            })
            .collect();
        match delta {
            None => render(&self.endpoints_version, &resources),
            Some((since, _)) => {
                let d = EndpointsDelta { version_info: self.endpoints_version.clone(), since: since.into(), resources };
                Bytes::from(serde_json::to_vec(&d).expect("endpoints serialize"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn key(host: &str) -> EdsKey {
        EdsKey { hostname: host.into(), port: 80, labels: BTreeMap::new() }
    }

    fn view(hosts: &[&str]) -> Arc<View> {
        let cfg = ScopeConfig {
            clusters: hosts
                .iter()
                .map(|h| mesh_proxy::config::RawCluster { name: format!("c-{h}"), ..Default::default() })
                .collect(),
            eds: hosts.iter().map(|h| Some(key(h))).collect(),
            ..Default::default()
        };
        Arc::new(View::new(&cfg))
    }

    #[test]
    fn deltas_carry_only_changed_clusters_of_the_scope_and_fall_back_to_everything() {
        let v = view(&["a", "b"]);
        let t0 = EdsTable::new(7).with([(key("a"), vec!["10.0.0.1:80".into()]), (key("b"), vec![])]).0;
        let s0 = Snapshot::new(v.clone(), Arc::new(t0.clone()), 1, Instant::now());
        // A change to `b` and one to a cluster outside the scope.
        let (t1, changed) = t0.with([(key("b"), vec!["10.0.0.2:80".into()]), (key("zz"), vec![])]);
        assert_eq!(changed, [key("b"), key("zz")]);
        let s1 = Snapshot::new(v.clone(), Arc::new(t1), 2, Instant::now());
        let delta: serde_json::Value =
            serde_json::from_slice(&s1.endpoints_delta(&s0.endpoints_version).unwrap()).unwrap();
        assert_eq!(delta["resources"], serde_json::json!([{"cluster": "c-b", "addresses": ["10.0.0.2:80"]}]));
        assert_eq!(delta["since"], s0.endpoints_version.as_str());
        // Another run's version, or another view's, gets everything.
        assert!(s1.endpoints_delta("x-7-1").is_none());
        let other = Snapshot::new(view(&["a"]), s1.eds.clone(), 2, Instant::now());
        assert!(other.endpoints_delta(&s0.endpoints_version).is_none());
        // The full answer parses as the proxy's discovery envelope.
        let full =
            mesh_proxy::config::DiscoveryResponse::<RawEndpoints>::from_json("t", &s1.body(Type::Endpoints)).unwrap();
        assert_eq!(full.resources.len(), 2);
    }
}

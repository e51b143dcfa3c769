//! Applying configuration updates: from the file (on change or SIGHUP) and from discovery.
//!
//! Every update goes the same way: merge the sources' routing into one [`RawRouting`], validate
//! it, bind any new listener, build a snapshot, swap it in. A failure at any step rejects the update
//! (Envoy's NACK): the last good config keeps serving, and the rejection is recorded for
//! `/config_dump` and counted in `mesh_proxy_config_updates_total{result="rejected"}`. A file
//! whose bootstrap differs from the one the process started with is rejected too (see
//! [`crate::config::bootstrap`]).
//!
//! The sources: [`file`](mod@file) (inotify, SIGHUP) and [`discovery`] (polling); beside them, the
//! namespace's [`interfaces`] are re-read for the data plane.

pub mod discovery;
pub mod file;
pub mod interfaces;

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::runtime::Handle;

use crate::{
    config::{
        self, bootstrap::Fixed, Bootstrap, Loaded, RawCluster, RawEndpoints, RawListener, RawRoute, RawRouting, Routing,
    },
    data::{
        accept::{Listeners, Prepared},
        cluster::EndpointRegistry,
        inbound::LocalAddrs,
        snapshot::{Origin, Snapshot},
        Proxy,
    },
    drain,
    metrics::Metrics,
};

/// The latest answer of each discovery type; `None` until the server has answered for that type
/// (the file's section is used meanwhile, and when the server answers 404 for it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discovered {
    pub listeners: Option<(String, Vec<RawListener>)>,
    pub routes: Option<(String, Vec<RawRoute>)>,
    pub clusters: Option<(String, Vec<RawCluster>)>,
    pub endpoints: Option<(String, Vec<RawEndpoints>)>,
}

/// An update that was refused.
#[derive(Debug, Clone, Serialize)]
pub struct Rejection {
    pub source: String,
    pub version: String,
    pub error: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
}

/// Why an update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error(transparent)]
    Bind(#[from] crate::data::accept::BindError),
    #[error(transparent)]
    Bootstrap(#[from] Fixed),
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The merged input equals what is serving.
    Unchanged,
    Rejected,
}

/// What made the file be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A file-system event on the file's chain: read, and applied only if its content is new.
    FileChanged,
    /// SIGHUP: read and applied (or rejected) whatever it holds.
    Sighup,
}

/// Inputs and outcomes of updates; behind one mutex so updates are applied one at a time. Never
/// locked by the admin API, which must answer while an update is being built.
struct State {
    /// The file's routing as last read successfully.
    file: RawRouting,
    file_version: String,
    /// The content hash of the file as last read, applied or not: a file event that leaves the
    /// content as it was changes nothing.
    file_seen: Option<String>,
    discovered: Discovered,
    /// The merged routing that is serving, to skip updates that change nothing.
    applied: RawRouting,
    /// The discovery answer last refused: polled again unchanged, it is not re-tried.
    rejected_discovery: Option<Discovered>,
}

pub struct Control {
    /// Fixed at start; every file update is checked against it.
    pub bootstrap: Bootstrap,
    /// The data plane's shared state, whose snapshot updates replace.
    pub proxy: Arc<Proxy>,
    pub listeners: Listeners,
    registry: EndpointRegistry,
    path: PathBuf,
    /// The command line's, applied to every reload as at start.
    overrides: config::Overrides,
    /// `file:<path>`: the source of a snapshot no discovery answer contributed to.
    file_source: String,
    /// Where the admin API is bound: one of the proxy's own addresses.
    admin: SocketAddr,
    state: Mutex<State>,
    /// Apart from `state`, so `/config_dump` never waits for an update being built.
    last_rejected: Mutex<Option<Rejection>>,
}

impl Control {
    /// Validates the file's routing, binds its listeners and serves it: the data plane's state is
    /// made here, with the first snapshot, and its listeners accept on `data` from then on.
    pub fn start(
        loaded: Loaded,
        admin: SocketAddr,
        data: Handle,
        drain: Arc<drain::Trigger>,
        local_addrs: LocalAddrs,
        metrics: Arc<Metrics>,
        tproxy: Option<u32>,
    ) -> Result<Self, UpdateError> {
        let Loaded { path, overrides, version, bootstrap, routing: raw } = loaded;
        let file_source = format!("file:{}", path.display());
        let routing = raw.validate(&bootstrap)?;
        let listeners = Listeners::new(data, drain, tproxy);
        let prepared = listeners.prepare(&routing.listeners)?;
        refuse_loops(&routing, &prepared, admin, &local_addrs)?;
        let registry = EndpointRegistry::default();
        let origin = Origin { source: file_source.clone(), version: format!("file={version}") };
        let snapshot = build(routing, origin, &prepared, admin, &registry, &metrics);
        registry.prune();
        let (idle, stream_idle) = (bootstrap.tcp_idle_timeout, bootstrap.stream_idle_timeout);
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let proxy = Arc::new(Proxy::new(snapshot, metrics, local_addrs, idle, stream_idle));
        listeners.commit(prepared, &proxy);
        let state = State {
            file: raw.clone(),
            file_seen: Some(version.clone()),
            file_version: version,
            discovered: Discovered::default(),
            applied: raw,
            rejected_discovery: None,
        };
        Ok(Self {
            bootstrap,
            proxy,
            listeners,
            registry,
            path,
            overrides,
            file_source,
            admin,
            state: Mutex::new(state),
            last_rejected: Mutex::new(None),
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.proxy.metrics
    }

    pub fn last_rejected(&self) -> Option<Rejection> {
        self.last_rejected.lock().expect("rejection lock poisoned").clone()
    }

    /// Re-reads the file and applies it, on a blocking thread: building a large config takes
    /// time the control runtime's other tasks (the admin API among them) must not wait for.
    pub async fn reload_file(self: &Arc<Self>, trigger: Trigger) -> Outcome {
        let control = self.clone();
        tokio::task::spawn_blocking(move || control.reload_file_now(trigger)).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "the config reload panicked; the last good config keeps serving");
            Outcome::Rejected
        })
    }

    /// Re-reads the file and applies it, on the calling thread.
    pub fn reload_file_now(&self, trigger: Trigger) -> Outcome {
        let text = config::read(&self.path);
        let version = text.as_ref().ok().map(|t| t.version.clone());
        let mut state = self.state.lock().expect("state lock poisoned");
        if trigger == Trigger::FileChanged && version.is_some() && version == state.file_seen {
            return Outcome::Unchanged;
        }
        state.file_seen = version;
        let loaded = text.and_then(|t| {
            tracing::info!(version = %t.version, path = %t.path.display(), "config file read; applying it");
            t.parse(&self.overrides)
        });
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                let version = e.version.map_or_else(|| "unreadable".to_string(), |v| format!("file={v}"));
                self.reject("file", &version, &e.error.into());
                return Outcome::Rejected;
            }
        };
        if let Err(e) = self.bootstrap.check_unchanged(&loaded.bootstrap) {
            self.reject("file", &format!("file={}", loaded.version), &e.into());
            return Outcome::Rejected;
        }
        let (old_file, old_version) = (state.file.clone(), state.file_version.clone());
        state.file = loaded.routing;
        state.file_version = loaded.version;
        let outcome = self.apply(&mut state, "file");
        if outcome == Outcome::Rejected {
            // Keep merging discovery answers with the file that was good.
            state.file = old_file;
            state.file_version = old_version;
        }
        outcome
    }

    /// Applies a discovery poll's answers.
    pub fn apply_discovered(&self, discovered: Discovered) -> Outcome {
        let mut state = self.state.lock().expect("state lock poisoned");
        if state.discovered == discovered || state.rejected_discovery.as_ref() == Some(&discovered) {
            return Outcome::Unchanged;
        }
        let old = std::mem::replace(&mut state.discovered, discovered);
        let outcome = self.apply(&mut state, "discovery");
        if outcome == Outcome::Rejected {
            // Keep merging file changes with the answer that was good.
            let rejected = std::mem::replace(&mut state.discovered, old);
            state.rejected_discovery = Some(rejected);
        }
        outcome
    }

    /// Records a discovery answer that could not even be parsed. The same error polled again is
    /// not counted again.
    pub fn reject_discovery(&self, e: config::Error) {
        let error = UpdateError::from(e);
        let msg = error.to_string();
        let mut last = self.last_rejected.lock().expect("rejection lock poisoned");
        if last.as_ref().is_some_and(|r| r.source == "discovery" && r.error == msg) {
            return;
        }
        *last = Some(self.rejection("discovery", "unparsable", &error));
    }

    /// The file's routing with each section a discovery answer replaces, its version and source.
    fn merged(&self, state: &State) -> (RawRouting, String, String) {
        let mut raw = state.file.clone();
        let mut version = format!("file={}", state.file_version);
        let d = &state.discovered;
        let from_discovery = [
            replace(&mut raw.listeners, &d.listeners, "lds", &mut version),
            replace(&mut raw.routes, &d.routes, "rds", &mut version),
            replace(&mut raw.clusters, &d.clusters, "cds", &mut version),
            replace(&mut raw.endpoints, &d.endpoints, "eds", &mut version),
        ]
        .contains(&true);
        let source = match (&self.bootstrap.discovery, from_discovery) {
            (Some(disc), true) => format!("discovery:{}", disc.url),
            _ => self.file_source.clone(),
        };
        (raw, version, source)
    }

    fn apply(&self, state: &mut State, trigger: &str) -> Outcome {
        let (raw, version, source) = self.merged(state);
        if raw == state.applied {
            return Outcome::Unchanged;
        }
        match self.try_apply(&raw, &version, &source) {
            Ok(()) => {
                state.applied = raw;
                self.metrics().config_update(trigger, true);
                tracing::info!(%version, %source, "configuration applied");
                Outcome::Applied
            }
            Err(e) => {
                self.reject(trigger, &version, &e);
                Outcome::Rejected
            }
        }
    }

    fn try_apply(&self, raw: &RawRouting, version: &str, source: &str) -> Result<(), UpdateError> {
        let routing = raw.validate(&self.bootstrap)?;
        let prepared = self.listeners.prepare(&routing.listeners)?;
        refuse_loops(&routing, &prepared, self.admin, &self.proxy.local_addrs.load())?;
        let origin = Origin { source: source.to_string(), version: version.to_string() };
        let snapshot = build(routing, origin, &prepared, self.admin, &self.registry, self.metrics());
        let old = self.proxy.snapshot.swap(Arc::new(snapshot));
        self.listeners.commit(prepared, &self.proxy);
        // The endpoints only the old snapshot held go once nothing uses it (requests in flight
        // may still); those it shared with the new one stay registered.
        drop(old);
        self.registry.prune();
        Ok(())
    }

    fn rejection(&self, source: &str, version: &str, e: &UpdateError) -> Rejection {
        self.metrics().config_update(source, false);
        tracing::warn!(%source, %version, error = %e, "configuration update rejected; the last good one keeps serving");
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Rejection { source: source.to_string(), version: version.to_string(), error: e.to_string(), at }
    }

    fn reject(&self, source: &str, version: &str, e: &UpdateError) {
        let r = self.rejection(source, version, e);
        *self.last_rejected.lock().expect("rejection lock poisoned") = Some(r);
    }
}

/// Replaces a section of the file by a discovery answer, if there is one, and adds its version as
/// `kind=version_info`. Returns whether it did.
fn replace<T: Clone>(
    section: &mut Vec<T>,
    answer: &Option<(String, Vec<T>)>,
    kind: &str,
    version: &mut String,
) -> bool {
    let Some((v, resources)) = answer else { return false };
    *section = resources.clone();
    version.push_str(&format!(",{kind}={v}"));
    true
}

/// Refuses an endpoint that is one of the proxy's own addresses once `prepared` is committed
/// (its listeners, the admin API): it would loop.
fn refuse_loops(
    routing: &Routing,
    prepared: &Prepared,
    admin: SocketAddr,
    local: &LocalAddrs,
) -> Result<(), UpdateError> {
    let own: Vec<SocketAddr> = prepared.addresses().iter().copied().chain([admin]).collect();
    Ok(config::loops::check(&routing.clusters, &own, |ip| local.contains(ip))?)
}

/// The snapshot of `routing` once `prepared` is committed: its own addresses are where its
/// listeners and the admin API are bound.
fn build(
    routing: Routing,
    origin: Origin,
    prepared: &Prepared,
    admin: SocketAddr,
    registry: &EndpointRegistry,
    metrics: &Metrics,
) -> Snapshot {
    let own = prepared.addresses().iter().copied().chain([admin]).collect();
    Snapshot::build(routing, origin, own, registry, metrics)
}

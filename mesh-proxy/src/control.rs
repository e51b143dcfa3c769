//! Applying configuration updates: from the file (on change or SIGHUP) and from discovery.
//!
//! Every update goes the same way: merge the sources into one [`RawConfig`], validate it, bind any
//! new listener, build a snapshot, swap it in. A failure at any step rejects the update (Envoy's
//! NACK): the last good config keeps serving, and the rejection is recorded for `/config_dump` and
//! counted in `mesh_proxy_config_updates_total{result="rejected"}`.
//!
//! The sources: [`file`] (inotify, SIGHUP) and [`discovery`] (polling).

pub mod discovery;
pub mod file;

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use arc_swap::ArcSwap;
use serde::Serialize;

use crate::{
    config::{self, Config, RawCluster, RawConfig, RawEndpoints, RawListener, RawRoute},
    data::{
        accept::Listeners,
        cluster::EndpointRegistry,
        snapshot::{Origin, SharedSnapshot, Snapshot},
    },
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
    #[error("admin.address cannot change while running ({running} → {wanted}); restart to move it")]
    AdminMoved { running: std::net::SocketAddr, wanted: std::net::SocketAddr },
    #[error("readiness.address cannot change while running ({running} → {wanted}); restart to change it")]
    ReadinessMoved { running: String, wanted: String },
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// The merged input equals what is serving.
    Unchanged,
    Rejected,
}

/// Inputs and outcomes of updates; behind one mutex so updates are applied one at a time.
struct State {
    /// The file as last read successfully.
    file: RawConfig,
    file_version: String,
    discovered: Discovered,
    /// The merged input that is serving, to skip updates that change nothing.
    applied: RawConfig,
    last_rejected: Option<Rejection>,
    /// The discovery answer last refused: polled again unchanged, it is not re-tried.
    rejected_discovery: Option<Discovered>,
}

pub struct Control {
    pub snapshot: SharedSnapshot,
    pub metrics: Arc<Metrics>,
    pub listeners: Listeners,
    registry: EndpointRegistry,
    path: PathBuf,
    state: Mutex<State>,
}

impl Control {
    /// Starts with an already validated file: binds its listeners and serves it.
    pub fn start(
        path: PathBuf,
        raw: RawConfig,
        text_version: String,
        snapshot: SharedSnapshot,
        metrics: Arc<Metrics>,
        listeners: Listeners,
        registry: EndpointRegistry,
    ) -> Result<Self, UpdateError> {
        let config = raw.validate()?;
        let prepared = listeners.prepare(&config.listeners)?;
        listeners.commit(prepared);
        let state = State {
            file: raw.clone(),
            file_version: text_version,
            discovered: Discovered::default(),
            applied: raw,
            last_rejected: None,
            rejected_discovery: None,
        };
        Ok(Self { snapshot, metrics, listeners, registry, path, state: Mutex::new(state) })
    }

    /// Builds the first snapshot, before the control plane exists (the proxy needs it to start).
    pub fn first_snapshot(
        path: &Path,
        raw: &RawConfig,
        version: String,
        registry: &EndpointRegistry,
        metrics: &Metrics,
    ) -> Result<SharedSnapshot, config::Error> {
        let config = raw.validate()?;
        let origin = Origin { source: format!("file:{}", path.display()), version: format!("file={version}") };
        Ok(Arc::new(ArcSwap::from_pointee(Snapshot::build(config, origin, registry, metrics))))
    }

    pub fn last_rejected(&self) -> Option<Rejection> {
        self.state.lock().expect("state lock poisoned").last_rejected.clone()
    }

    /// Re-reads the file and applies it.
    pub fn reload_file(&self) -> Outcome {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(error) => {
                let e = config::Error::Read { path: self.path.display().to_string(), error };
                self.reject("file", "unreadable", &e.into());
                return Outcome::Rejected;
            }
        };
        let version = content_version(&text);
        let raw = match RawConfig::from_yaml(&self.path.display().to_string(), &text) {
            Ok(r) => r,
            Err(e) => {
                self.reject("file", &format!("file={version}"), &e.into());
                return Outcome::Rejected;
            }
        };
        let mut state = self.state.lock().expect("state lock poisoned");
        let (old_file, old_version) = (state.file.clone(), state.file_version.clone());
        state.file = raw;
        state.file_version = version;
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
        let mut state = self.state.lock().expect("state lock poisoned");
        if state.last_rejected.as_ref().is_some_and(|r| r.source == "discovery" && r.error == msg) {
            return;
        }
        state.last_rejected = Some(self.rejection("discovery", "unparsable", &error));
    }

    /// The discovery settings in force.
    pub fn discovery(&self) -> Option<config::Discovery> {
        self.snapshot.load().config.discovery.clone()
    }

    fn merged(state: &State) -> (RawConfig, String, String) {
        let mut raw = state.file.clone();
        let mut version = format!("file={}", state.file_version);
        let d = &state.discovered;
        let mut from_discovery = false;
        if let Some((v, l)) = &d.listeners {
            raw.listeners = l.clone();
            version.push_str(&format!(",lds={v}"));
            from_discovery = true;
        }
        if let Some((v, r)) = &d.routes {
            raw.routes = r.clone();
            version.push_str(&format!(",rds={v}"));
            from_discovery = true;
        }
        if let Some((v, c)) = &d.clusters {
            raw.clusters = c.clone();
            version.push_str(&format!(",cds={v}"));
            from_discovery = true;
        }
        if let Some((v, e)) = &d.endpoints {
            raw.endpoints = e.clone();
            version.push_str(&format!(",eds={v}"));
            from_discovery = true;
        }
        let source = match (&raw.discovery, from_discovery) {
            (Some(disc), true) => format!("discovery:{}", disc.url),
            _ => "file".to_string(),
        };
        (raw, version, source)
    }

    fn apply(&self, state: &mut State, trigger: &str) -> Outcome {
        let (raw, version, source) = Self::merged(state);
        if raw == state.applied {
            return Outcome::Unchanged;
        }
        match self.try_apply(&raw, &version, &source) {
            Ok(()) => {
                state.applied = raw;
                self.metrics.config_update(trigger, true);
                tracing::info!(%version, %source, "configuration applied");
                Outcome::Applied
            }
            Err(e) => {
                let rejection = self.rejection(trigger, &version, &e);
                state.last_rejected = Some(rejection);
                Outcome::Rejected
            }
        }
    }

    fn try_apply(&self, raw: &RawConfig, version: &str, source: &str) -> Result<(), UpdateError> {
        let config: Config = raw.validate()?;
        let running = self.snapshot.load().config.admin;
        if config.admin != running {
            return Err(UpdateError::AdminMoved { running, wanted: config.admin });
        }
        let running = self.snapshot.load().config.readiness;
        if config.readiness != running {
            let show = |r: Option<config::Readiness>| r.map_or("none".to_string(), |r| r.address.to_string());
            return Err(UpdateError::ReadinessMoved { running: show(running), wanted: show(config.readiness) });
        }
        let prepared = self.listeners.prepare(&config.listeners)?;
        let origin = Origin { source: source.to_string(), version: version.to_string() };
        let snapshot = Snapshot::build(config, origin, &self.registry, &self.metrics);
        self.snapshot.store(Arc::new(snapshot));
        self.listeners.commit(prepared);
        Ok(())
    }

    fn rejection(&self, source: &str, version: &str, e: &UpdateError) -> Rejection {
        self.metrics.config_update(source, false);
        tracing::warn!(%source, %version, error = %e, "configuration update rejected; the last good one keeps serving");
        let at = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Rejection { source: source.to_string(), version: version.to_string(), error: e.to_string(), at }
    }

    fn reject(&self, source: &str, version: &str, e: &UpdateError) {
        let r = self.rejection(source, version, e);
        self.state.lock().expect("state lock poisoned").last_rejected = Some(r);
    }
}

/// A short content hash, the file's version in `/config_dump`.
pub fn content_version(text: &str) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    format!("{:016x}", h.finish())
}

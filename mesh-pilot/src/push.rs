//! From changes to snapshots: the one task that owns the model, debounces, builds and publishes.
//!
//! Config changes (Services, Istio rules) are debounced as istiod does: a build starts once
//! changes have been quiet for 100 ms, or 10 s after the first if they never are. Endpoint changes
//! (EndpointSlices, Pods, WorkloadEntries) are not held behind that: they are applied to the
//! endpoint table at once, against the config in force, and only the scopes whose clusters they
//! touch get a new snapshot. Nothing is published before the adapter says it has synced.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    analysis::Finding,
    metrics::{BuildLabels, Metrics},
    model::{Change, Registry, Store},
    snapshot::{EdsTable, Snapshot, View},
    status::Tracker,
    translate::{self, EdsKey, Options, Translator},
};

/// Istio's `PILOT_DEBOUNCE_AFTER`: quiet time before a config build.
pub const DEBOUNCE_AFTER: Duration = Duration::from_millis(100);
/// Istio's `PILOT_DEBOUNCE_MAX`: longest a config change waits.
pub const DEBOUNCE_MAX: Duration = Duration::from_secs(10);
/// Snapshots kept per scope for requests pinned to one (the rest of a poll).
const HISTORY: usize = 8;

/// What adapters send.
#[derive(Debug)]
pub enum Input {
    /// Changes, with when the adapter saw them (push latency counts from there).
    Changes(Vec<Change>, Instant),
    /// Every watcher has delivered its initial list: serving may start.
    Synced,
}

/// A request to render a namespace no proxy asked for before; answered once it is there.
pub type ScopeRequest = (String, oneshot::Sender<()>);

/// One namespace's current snapshot and its recent predecessors.
pub struct Slot {
    pub tx: watch::Sender<Arc<Snapshot>>,
    history: VecDeque<Arc<Snapshot>>,
}

impl Slot {
    /// The snapshot named `version`, if it is the current one or a recent one.
    pub fn find(&self, version: &str) -> Option<Arc<Snapshot>> {
        let cur = self.tx.borrow().clone();
        if cur.version == version {
            return Some(cur);
        }
        self.history.iter().rev().find(|s| s.version == version).cloned()
    }
}

/// What the admin API shows about the last build (shared parts, so an endpoint push that only
/// replaces the registry copies nothing else).
#[derive(Debug, Default, Clone)]
pub struct Debug {
    pub findings: Arc<Vec<Finding>>,
    /// Every object, as read (turned into JSON only when `/debug/configz` asks).
    pub config: Arc<Vec<Arc<crate::resource::Object>>>,
    pub registry: Arc<Registry>,
}

/// State the HTTP handlers read.
pub struct Shared {
    pub scopes: RwLock<HashMap<String, Slot>>,
    pub status: Tracker,
    pub metrics: Metrics,
    pub debug: RwLock<Arc<Debug>>,
    /// True once the adapters synced and the first build is out.
    pub ready: watch::Sender<bool>,
    scope_requests: mpsc::UnboundedSender<ScopeRequest>,
}

impl Shared {
    /// The current snapshot of a namespace's scope, rendering it first if no proxy asked before.
    /// `None` until the first build (the adapters have not synced).
    pub async fn scope(&self, namespace: &str) -> Option<watch::Receiver<Arc<Snapshot>>> {
        if !*self.ready.borrow() {
            return None;
        }
        if let Some(slot) = self.scopes.read().expect("scopes lock").get(namespace) {
            return Some(slot.tx.subscribe());
        }
        let (tx, rx) = oneshot::channel();
        self.scope_requests.send((namespace.to_string(), tx)).ok()?;
        rx.await.ok()?;
        self.scopes.read().expect("scopes lock").get(namespace).map(|s| s.tx.subscribe())
    }
}

/// The builder: owns the model.
pub struct Builder {
    store: Store,
    opts: Options,
    shared: Arc<Shared>,
    eds: Arc<EdsTable>,
    /// The config view in force per namespace.
    views: HashMap<String, Arc<View>>,
    synced: bool,
}

impl Builder {
    pub fn new(opts: Options, metrics: Metrics) -> (Builder, Arc<Shared>, mpsc::UnboundedReceiver<ScopeRequest>) {
        let (scope_tx, scope_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            scopes: RwLock::new(HashMap::new()),
            status: Tracker::default(),
            metrics,
            debug: RwLock::new(Arc::new(Debug::default())),
            ready: watch::Sender::new(false),
            scope_requests: scope_tx,
        });
        let boot =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let b = Builder {
            store: Store::default(),
            opts,
            shared: shared.clone(),
            eds: Arc::new(EdsTable::new(boot)),
            views: HashMap::new(),
            synced: false,
        };
        (b, shared, scope_rx)
    }

    /// Runs until `inputs` closes.
    pub async fn run(
        mut self,
        mut inputs: mpsc::Receiver<Input>,
        mut scope_requests: mpsc::UnboundedReceiver<ScopeRequest>,
    ) {
        // (first change, last change, when the first was seen by the adapter)
        let mut pending_config: Option<(Instant, Instant, Instant)> = None;
        let mut waiting_scopes: Vec<ScopeRequest> = Vec::new();
        loop {
            let deadline = pending_config.map(|(first, last, _)| (last + DEBOUNCE_AFTER).min(first + DEBOUNCE_MAX));
            let mut pending_eds: Option<Instant> = None;
            tokio::select! {
                input = inputs.recv() => {
                    let Some(input) = input else { return };
                    // Take everything already queued: one build for a burst.
                    let mut batch = vec![input];
                    while let Ok(more) = inputs.try_recv() {
                        batch.push(more);
                    }
                    for input in batch {
                        match input {
                            Input::Synced => self.synced = true,
                            Input::Changes(changes, at) => {
                                let touched = self.store.apply(changes);
                                if touched.config {
                                    let now = Instant::now();
                                    pending_config = Some(match pending_config {
                                        Some((first, _, seen)) => (first, now, seen.min(at)),
                                        None => (now, now, at),
                                    });
                                }
                                if touched.endpoints {
                                    pending_eds = Some(pending_eds.map_or(at, |p: Instant| p.min(at)));
                                }
                            }
                        }
                    }
                    if self.synced && !*self.shared.ready.borrow() {
                        // The first build waits for nothing: the adapters have everything.
                        let seen = pending_config.map_or(Instant::now(), |p| p.2);
                        self.build_config(seen);
                        pending_config = None;
                        self.shared.ready.send_replace(true);
                        for (ns, reply) in waiting_scopes.drain(..) {
                            self.add_scope(&ns);
                            let _ = reply.send(());
                        }
                        continue;
                    }
                }
                _ = sleep_until(deadline) => {
                    if self.synced {
                        if let Some((_, _, seen)) = pending_config.take() {
                            self.build_config(seen);
                        }
                    }
                }
                req = scope_requests.recv() => {
                    let Some((ns, reply)) = req else { return };
                    if *self.shared.ready.borrow() {
                        self.add_scope(&ns);
                        let _ = reply.send(());
                    } else {
                        waiting_scopes.push((ns, reply));
                    }
                }
            }
            if let Some(seen) = pending_eds {
                if *self.shared.ready.borrow() {
                    self.push_endpoints(seen);
                }
            }
        }
    }

    /// A full build: registry, translation, every known scope, endpoints, findings.
    fn build_config(&mut self, seen: Instant) {
        let start = Instant::now();
        let registry = Registry::build(&self.store, &self.opts.domain);
        let translator = Translator::new(&self.store, &registry, &self.opts);
        let findings = translator.analyze();
        let namespaces: Vec<String> = self.shared.scopes.read().expect("scopes lock").keys().cloned().collect();
        let mut interned: HashMap<String, Arc<View>> = HashMap::new();
        let mut views = HashMap::new();
        for ns in namespaces {
            let view = View::new(&translator.scope(&ns));
            let view = interned.entry(view.id.clone()).or_insert_with(|| Arc::new(view)).clone();
            views.insert(ns, view);
        }
        drop(translator);
        self.views = views;
        self.update_endpoints(&registry, true, seen);
        let debug = Debug {
            findings: Arc::new(findings),
            config: Arc::new(self.store.objects.values().cloned().collect()),
            registry: Arc::new(registry),
        };
        *self.shared.debug.write().expect("debug lock") = Arc::new(debug);
        self.observe_build("config", start);
    }

    /// Renders a namespace no proxy asked for before, against the current model.
    fn add_scope(&mut self, ns: &str) {
        if self.views.contains_key(ns) {
            return;
        }
        let start = Instant::now();
        let registry = Registry::build(&self.store, &self.opts.domain);
        let view = View::new(&Translator::new(&self.store, &registry, &self.opts).scope(ns));
        let view = self.views.values().find(|v| v.id == view.id).cloned().unwrap_or_else(|| Arc::new(view));
        // Its endpoints: keys no other scope had are added to the table first.
        let missing: Vec<(EdsKey, Vec<String>)> = view
            .keys
            .iter()
            .filter(|k| !self.eds.entries.contains_key(*k))
            .map(|k| (k.clone(), translate::endpoints(&registry, k)))
            .collect();
        if !missing.is_empty() {
            self.eds = Arc::new(self.eds.with(missing).0);
        }
        let snap = Arc::new(Snapshot::new(view.clone(), self.eds.clone(), max_seq(&view, &self.eds), Instant::now()));
        self.views.insert(ns.to_string(), view);
        let mut scopes = self.shared.scopes.write().expect("scopes lock");
        scopes.insert(ns.to_string(), Slot { tx: watch::Sender::new(snap), history: VecDeque::new() });
        drop(scopes);
        self.observe_build("scope", start);
    }

    /// An endpoint change: new endpoint table, new snapshots for the scopes it touches.
    fn push_endpoints(&mut self, seen: Instant) {
        let start = Instant::now();
        let registry = Registry::build(&self.store, &self.opts.domain);
        self.update_endpoints(&registry, false, seen);
        let mut debug = (**self.shared.debug.read().expect("debug lock")).clone();
        debug.registry = Arc::new(registry);
        *self.shared.debug.write().expect("debug lock") = Arc::new(debug);
        self.observe_build("endpoints", start);
    }

    /// Recomputes every cluster's endpoints and publishes: every scope after a config build
    /// (`all`), else only the scopes an endpoint change touched.
    fn update_endpoints(&mut self, registry: &Registry, all: bool, seen: Instant) {
        let keys: HashSet<EdsKey> = self.views.values().flat_map(|v| v.keys.iter().cloned()).collect();
        let updates: Vec<(EdsKey, Vec<String>)> =
            keys.iter().map(|k| (k.clone(), translate::endpoints(registry, k))).collect();
        let (mut table, changed) = self.eds.with(updates);
        if all {
            table.retain(&keys);
        } else if changed.is_empty() {
            return;
        }
        self.eds = Arc::new(table);
        let changed: HashSet<EdsKey> = changed.into_iter().collect();
        let mut scopes = self.shared.scopes.write().expect("scopes lock");
        for (ns, view) in &self.views {
            let Some(slot) = scopes.get_mut(ns) else { continue };
            let current = slot.tx.borrow().clone();
            let touched = changed.iter().any(|k| view.keys.contains(k));
            if Arc::ptr_eq(&current.view, view) && !touched {
                continue;
            }
            let seq = if Arc::ptr_eq(&current.view, view) { self.eds.seq } else { max_seq(view, &self.eds) };
            let snap = Arc::new(Snapshot::new(view.clone(), self.eds.clone(), seq, seen));
            if snap.version == current.version {
                continue;
            }
            slot.history.push_back(current);
            if slot.history.len() > HISTORY {
                slot.history.pop_front();
            }
            slot.tx.send_replace(snap);
        }
    }

    fn observe_build(&self, kind: &str, start: Instant) {
        self.shared
            .metrics
            .build_seconds
            .get_or_create(&BuildLabels { kind: kind.into() })
            .observe(start.elapsed().as_secs_f64());
    }
}

/// The last endpoint change among a view's clusters (its endpoints' version).
fn max_seq(view: &View, eds: &EdsTable) -> u64 {
    view.keys.iter().filter_map(|k| eds.entries.get(k)).map(|e| e.seq).max().unwrap_or(0)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

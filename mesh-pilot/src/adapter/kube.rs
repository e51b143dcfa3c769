//! The Kubernetes adapter: kube-rs watchers on `Service`, `EndpointSlice`, `Pod`, Istio's kinds and
//! our `LocalRateLimit`, every object turned into the same [`Change`]s the files adapter sends (each
//! goes through [`resource::parse`], so both adapters read objects identically).
//!
//! - **Sync gating**: [`Input::Synced`] is sent once every watcher has finished its initial list,
//!   so nothing is served from a partial view (a Service seen before its EndpointSlices would be
//!   served without endpoints). A custom resource whose CRD is not installed (404) counts as
//!   synced and empty, and is watched again at the next resync.
//! - **Re-lists**: after a watch is restarted (410 Gone, a dropped connection) the watcher lists
//!   again; objects missing from the new list are deleted. Every `resync` period the watchers are
//!   restarted on purpose, a full re-list that repairs anything a watch could have missed.
//! - **Connection**: in-cluster (service account), or `--kubeconfig` (else `$KUBECONFIG`,
//!   `~/.kube/config`).
//!
//! It only ever lists and watches: the RBAC in `deploy/mesh-pilot/` grants exactly that.

use std::{
    collections::BTreeSet,
    fmt::Debug,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1 as core, discovery::v1 as discovery};
use kube::{
    api::{Api, ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt},
    Client, Resource,
};
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::mpsc;

use crate::{
    model::Change,
    push::Input,
    resource::{self, Key, Kind, Origin, ISTIO_GROUP, OWN_GROUP, OWN_VERSION},
};

/// Istio's default for how often informers are refreshed is none; a long period bounds how long a
/// missed event can last.
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--kubeconfig {path}: {error}")]
    Kubeconfig { path: String, error: String },
    #[error("connecting to Kubernetes (in-cluster, $KUBECONFIG or ~/.kube/config): {0}")]
    Infer(String),
    #[error("creating the Kubernetes client: {0}")]
    Client(String),
}

/// How to reach the API server.
#[derive(Clone)]
pub enum Source {
    /// In-cluster config, else `$KUBECONFIG`, else `~/.kube/config`.
    Infer,
    Kubeconfig(PathBuf),
    /// A client made by the caller (tests: kube-rs's client over a mock service).
    Client(Client),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Infer => write!(f, "Infer"),
            Source::Kubeconfig(p) => write!(f, "Kubeconfig({})", p.display()),
            Source::Client(_) => write!(f, "Client"),
        }
    }
}

pub async fn client(source: &Source) -> Result<Client, Error> {
    let config = match source {
        Source::Client(c) => return Ok(c.clone()),
        Source::Infer => kube::Config::infer().await.map_err(|e| Error::Infer(e.to_string()))?,
        Source::Kubeconfig(path) => {
            let err = |e: &dyn std::fmt::Display| Error::Kubeconfig {
                path: path.display().to_string(),
                error: e.to_string(),
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await.map_err(|e| err(&e))?
        }
    };
    Client::try_from(config).map_err(|e| Error::Client(e.to_string()))
}

/// Istio's kinds (`networking.istio.io`, the version given) and ours, as dynamic resources.
fn custom_kinds(istio_version: &str) -> Vec<(Kind, ApiResource)> {
    let res = |group: &str, version: &str, kind: &str, plural: &str| ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    };
    vec![
        (Kind::VirtualService, res(ISTIO_GROUP, istio_version, "VirtualService", "virtualservices")),
        (Kind::DestinationRule, res(ISTIO_GROUP, istio_version, "DestinationRule", "destinationrules")),
        (Kind::ServiceEntry, res(ISTIO_GROUP, istio_version, "ServiceEntry", "serviceentries")),
        (Kind::WorkloadEntry, res(ISTIO_GROUP, istio_version, "WorkloadEntry", "workloadentries")),
        (Kind::Sidecar, res(ISTIO_GROUP, istio_version, "Sidecar", "sidecars")),
        (Kind::LocalRateLimit, res(OWN_GROUP, OWN_VERSION, "LocalRateLimit", "localratelimits")),
    ]
}

/// `(API group, resource)` of every kind watched: what the RBAC in `deploy/mesh-pilot/` grants
/// list and watch on (a test keeps the two equal).
pub fn watched(istio_version: &str) -> Vec<(String, String)> {
    fn typed<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    let mut out = vec![typed::<core::Service>(), typed::<discovery::EndpointSlice>(), typed::<core::Pod>()];
    out.extend(custom_kinds(istio_version).into_iter().map(|(_, ar)| (ar.group, ar.plural)));
    out
}

/// Starts every watcher; returns once they run. Sends [`Input::Synced`] when all have listed.
pub fn watch(
    client: Client,
    istio_version: &str,
    resync: Duration,
    tx: mpsc::Sender<Input>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // Each watcher sends one `()` when its first list is complete.
    let (ptx, mut prx) = mpsc::channel::<()>(16);
    let mut tasks = vec![
        spawn_typed::<core::Service>(Api::all(client.clone()), Kind::Service, resync, tx.clone(), ptx.clone()),
        spawn_typed::<discovery::EndpointSlice>(
            Api::all(client.clone()),
            Kind::EndpointSlice,
            resync,
            tx.clone(),
            ptx.clone(),
        ),
        spawn_typed::<core::Pod>(Api::all(client.clone()), Kind::Pod, resync, tx.clone(), ptx.clone()),
    ];
    let custom = custom_kinds(istio_version);
    let total = 3 + custom.len();
    for (kind, ar) in custom {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        tasks.push(tokio::spawn(run(api, kind, resync, tx.clone(), ptx.clone(), Some(ar))));
    }
    tasks.push(tokio::spawn(async move {
        let mut synced = 0;
        while prx.recv().await.is_some() {
            synced += 1;
            if synced == total {
                tracing::info!("every Kubernetes watcher has listed: serving");
                let _ = tx.send(Input::Synced).await;
                return;
            }
        }
    }));
    tasks
}

fn spawn_typed<K>(
    api: Api<K>,
    kind: Kind,
    resync: Duration,
    tx: mpsc::Sender<Input>,
    ptx: mpsc::Sender<()>,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    tokio::spawn(run(api, kind, resync, tx, ptx, None))
}

/// One kind's watcher, restarted every `resync`.
async fn run<K>(
    api: Api<K>,
    kind: Kind,
    resync: Duration,
    tx: mpsc::Sender<Input>,
    ptx: mpsc::Sender<()>,
    custom: Option<ApiResource>,
) where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static,
{
    let origin = Origin::kubernetes();
    // What this kind holds now, to delete what a re-list no longer has.
    let mut known: BTreeSet<Key> = BTreeSet::new();
    let mut announced = false;
    loop {
        let mut listing: Option<BTreeSet<Key>> = None;
        let stream = watcher(api.clone(), watcher::Config::default()).default_backoff();
        let mut stream = std::pin::pin!(stream.into_stream());
        let period = tokio::time::sleep(resync);
        tokio::pin!(period);
        loop {
            let event = tokio::select! {
                e = stream.next() => e,
                _ = &mut period => break,
            };
            let Some(event) = event else { break };
            let mut changes = Vec::new();
            match event {
                Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
                Ok(watcher::Event::InitApply(obj)) => {
                    if let Some(c) = upsert(&obj, kind, &origin, custom.as_ref()) {
                        if let (Some(l), Change::Upsert(o)) = (listing.as_mut(), &c) {
                            l.insert(o.meta.key.clone());
                        }
                        changes.push(c);
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    let listed = listing.take().unwrap_or_default();
                    changes.extend(known.difference(&listed).cloned().map(Change::Delete));
                    known = listed;
                    if !std::mem::replace(&mut announced, true) {
                        let _ = ptx.send(()).await;
                    }
                }
                Ok(watcher::Event::Apply(obj)) => {
                    if let Some(c) = upsert(&obj, kind, &origin, custom.as_ref()) {
                        if let Change::Upsert(o) = &c {
                            known.insert(o.meta.key.clone());
                            changes.push(Change::Errors {
                                source: error_source(&o.meta.key.to_string()),
                                errors: Vec::new(),
                            });
                        }
                        changes.push(c);
                    }
                }
                Ok(watcher::Event::Delete(obj)) => {
                    let key = key_of(&obj, kind);
                    known.remove(&key);
                    changes.push(Change::Errors { source: error_source(&key.to_string()), errors: Vec::new() });
                    changes.push(Change::Delete(key));
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s))) if s.code == 404 && custom.is_some() => {
                    // The CRD is not installed: nothing of this kind exists. Look again at the
                    // next resync.
                    if !std::mem::replace(&mut announced, true) {
                        tracing::info!(kind = %kind, "not installed in the cluster (404); watched again at the next resync");
                        let _ = ptx.send(()).await;
                    }
                    changes.extend(std::mem::take(&mut known).into_iter().map(Change::Delete));
                    if !changes.is_empty() {
                        let _ = tx.send(Input::Changes(changes, Instant::now())).await;
                    }
                    period.as_mut().await;
                    break;
                }
                Err(e) => {
                    // The backoff retries; the model keeps what it had.
                    tracing::warn!(kind = %kind, error = %e, "watch failed; retrying");
                }
            }
            if !changes.is_empty() && tx.send(Input::Changes(changes, Instant::now())).await.is_err() {
                return;
            }
        }
    }
}

fn key_of<K: Resource>(obj: &K, kind: Kind) -> Key {
    let meta = obj.meta();
    Key {
        kind,
        namespace: meta.namespace.clone().unwrap_or_else(|| resource::DEFAULT_NAMESPACE.into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// The object through the same parser as a file's, with its `apiVersion` and `kind` (a dynamic
/// object may lack them in a list).
fn upsert<K: Serialize>(obj: &K, kind: Kind, origin: &Arc<Origin>, custom: Option<&ApiResource>) -> Option<Change> {
    let mut value = serde_json::to_value(obj).ok()?;
    if let (Some(ar), Some(map)) = (custom, value.as_object_mut()) {
        map.insert("apiVersion".into(), ar.api_version.clone().into());
        map.insert("kind".into(), ar.kind.clone().into());
    }
    let parsed = resource::parse(value, origin).into_iter().next()?;
    match parsed {
        Ok(o) if o.meta.key.kind == kind => Some(Change::Upsert(o)),
        Ok(_) => None,
        // The object's last good version stays in force, as with a file.
        Err(e) => Some(Change::Errors { source: error_source(&e.resource), errors: vec![e] }),
    }
}

/// Parse errors of a Kubernetes object are kept under its name, so the next good version of it
/// (or its deletion) clears them.
fn error_source(resource: &str) -> String {
    format!("kubernetes:{resource}")
}

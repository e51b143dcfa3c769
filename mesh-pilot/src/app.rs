//! Starting a whole mesh-pilot: adapter, builder, discovery and admin servers. `main` calls
//! [`start`] and waits; tests call it in-process with port 0 and talk to the bound addresses.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};

use crate::{
    adapter::{files, kube},
    metrics::Metrics,
    push::{Builder, Input, Shared},
    server,
    translate::Options,
};

/// Where objects come from.
#[derive(Debug, Clone)]
pub enum Platform {
    /// `--config-dir`: a watched directory of Kubernetes-format YAML.
    Files(PathBuf),
    /// A Kubernetes API server, watched.
    Kubernetes {
        source: kube::Source,
        /// The version of Istio's CRDs to watch (`v1`, or `v1beta1` on older clusters).
        istio_version: String,
        resync: Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub platform: Platform,
    /// Discovery, for the proxies.
    pub listen: SocketAddr,
    /// Debug and metrics, for operators.
    pub admin: SocketAddr,
    pub translate: Options,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--listen {addr}: {error}")]
    Listen { addr: SocketAddr, error: std::io::Error },
    #[error("--admin {addr}: {error}")]
    Admin { addr: SocketAddr, error: std::io::Error },
    #[error(transparent)]
    Files(#[from] files::Error),
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// A running mesh-pilot. Dropping it stops every task.
pub struct Bound {
    pub discovery: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn start(cfg: Config) -> Result<Bound, Error> {
    let listener = TcpListener::bind(cfg.listen).await.map_err(|error| Error::Listen { addr: cfg.listen, error })?;
    let admin = TcpListener::bind(cfg.admin).await.map_err(|error| Error::Admin { addr: cfg.admin, error })?;
    let (builder, shared, scope_rx) = Builder::new(cfg.translate.clone(), Metrics::default());
    let (tx, rx) = mpsc::channel::<Input>(64);
    let mut tasks = vec![tokio::spawn(builder.run(rx, scope_rx))];
    match &cfg.platform {
        Platform::Files(dir) => {
            let (ctx, mut crx) = mpsc::channel(16);
            tasks.push(files::watch(dir.clone(), ctx).await?);
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let mut first = true;
                while let Some(changes) = crx.recv().await {
                    if tx.send(Input::Changes(changes, Instant::now())).await.is_err() {
                        return;
                    }
                    if std::mem::take(&mut first) && tx.send(Input::Synced).await.is_err() {
                        return;
                    }
                }
            }));
        }
        Platform::Kubernetes { source, istio_version, resync } => {
            let client = kube::client(source).await?;
            tasks.extend(kube::watch(client, istio_version, *resync, tx.clone()));
        }
    }
    let bound_discovery = listener.local_addr().map_err(|error| Error::Listen { addr: cfg.listen, error })?;
    let bound_admin = admin.local_addr().map_err(|error| Error::Admin { addr: cfg.admin, error })?;
    tasks.push(tokio::spawn(server::serve(listener, shared.clone(), server::discovery)));
    tasks.push(tokio::spawn(server::serve(admin, shared.clone(), server::admin)));
    Ok(Bound { discovery: bound_discovery, admin: bound_admin, shared, tasks })
}

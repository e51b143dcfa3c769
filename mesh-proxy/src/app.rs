//! A whole proxy, started and stopped: what `main` runs, and what a test starts in-process.
//!
//! [`build`] runs on the caller's runtime, which becomes the control runtime: the admin API, the
//! readiness port, reloads, discovery and the interface refresh are spawned there. The data plane
//! gets a runtime of its own, on threads of its own, so a saturated data plane never hides the
//! admin port. Everything is bound before [`build`] returns, and [`Bound`] says where, so a config
//! may ask for port 0.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::{mpsc, Notify},
    task::JoinSet,
};

use crate::{
    admin::{self, readiness, status, Admin},
    config::Loaded,
    control::{discovery, file, interfaces, Control, UpdateError},
    data::{accept::ListenerInfo, inbound::LocalAddrs},
    dns, drain,
    logging::LogHandle,
    metrics::Metrics,
};

/// Quiet time after a file event before the file is read.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(50);

/// What the process brings that the config file does not say (the command line's).
pub struct Options {
    /// Data-plane threads. One is a current-thread runtime on one thread.
    pub workers: usize,
    /// The installed log filter, which `POST /logging` changes; `None` when the embedder (a test)
    /// installed its own subscriber, and the endpoint then says so.
    pub log: Option<LogHandle>,
    /// The status port (application probes, merged metrics), when the injector asked for one.
    pub status: Option<status::Settings>,
    /// Serve DNS with the default settings even if the file has no `dns` section (`--dns-capture`,
    /// which `mesh-init inject --redirect-dns` sets, as Istio's `ISTIO_META_DNS_CAPTURE`).
    pub dns_capture: bool,
}

/// Why the proxy could not start, or stopped waiting.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("starting the data-plane runtime: {0}")]
    Runtime(io::Error),
    #[error("binding {field} {address}: {error}")]
    Bind { field: &'static str, address: SocketAddr, error: io::Error },
    #[error("reading interface addresses: {0}")]
    LocalAddrs(io::Error),
    /// The file's routing does not validate, or a listener cannot be bound.
    #[error(transparent)]
    Config(#[from] UpdateError),
    #[error("listening for {signal}: {error}")]
    Signal { signal: &'static str, error: io::Error },
    #[error(transparent)]
    Dns(#[from] dns::StartError),
}

/// A running proxy. Dropping it stops everything it started (listeners, tasks, the data plane)
/// without a drain; [`Bound::wait_termination`] drains first.
pub struct Bound {
    /// Where the admin API listens.
    pub admin: SocketAddr,
    /// Where the readiness port listens, if the config asks for one.
    pub readiness: Option<SocketAddr>,
    /// Where the status port listens, if the options ask for one.
    pub status: Option<SocketAddr>,
    /// Where the DNS proxy listens (UDP and TCP on each), if it runs.
    pub dns: Vec<SocketAddr>,
    /// The first config's listeners, one entry per bound socket.
    pub listeners: Vec<ListenerInfo>,
    control: Arc<Control>,
    drain: Arc<drain::Trigger>,
    /// Notified by `POST /quitquitquit`.
    shutdown: Arc<Notify>,
    /// The control side's tasks; dropping the set aborts them.
    _tasks: JoinSet<()>,
    /// The inotify watch of the config file's directory, while it lasts.
    _watcher: Option<notify::RecommendedWatcher>,
    data: DataPlane,
}

/// Binds everything `config` asks for and starts serving it.
pub async fn build(config: Loaded, options: Options) -> Result<Bound, Error> {
    let path = config.path.clone();
    let bootstrap = config.bootstrap.clone();
    let admin_listener = bind("admin.address", bootstrap.admin).await?;
    let admin = admin_listener.local_addr().map_err(|error| bind_error("admin.address", bootstrap.admin, error))?;
    let (readiness_listener, readiness) = match bootstrap.readiness {
        Some(r) => {
            let listener = bind("readiness.address", r.address).await?;
            let bound = listener.local_addr().map_err(|error| bind_error("readiness.address", r.address, error))?;
            (Some(listener), Some(bound))
        }
        None => (None, None),
    };
    let (status_listener, status_addr) = match &options.status {
        Some(st) => {
            let listener = bind("--status-address", st.address).await?;
            let bound = listener.local_addr().map_err(|error| bind_error("--status-address", st.address, error))?;
            (Some(listener), Some(bound))
        }
        None => (None, None),
    };

    let data = DataPlane::start(options.workers).map_err(Error::Runtime)?;
    let local = LocalAddrs::discover().map_err(Error::LocalAddrs)?;
    let drain = Arc::new(drain::Trigger::default());
    let metrics = Arc::new(Metrics::new());
    let control = Arc::new(Control::start(config, admin, data.handle(), drain.clone(), local, metrics.clone())?);
    let dns = match bootstrap.dns.clone().or_else(|| options.dns_capture.then(Default::default)) {
        Some(settings) => dns::start(&settings, control.proxy.snapshot.clone(), &metrics, &data.handle())?,
        None => Vec::new(),
    };

    let mut tasks = JoinSet::new();
    let shutdown = Arc::new(Notify::new());
    let api = Arc::new(Admin {
        control: control.clone(),
        log: options.log,
        shutdown: shutdown.clone(),
        drain: drain.clone(),
    });
    tracing::info!(address = %admin, workers = options.workers, "admin listening");
    tasks.spawn(admin::serve(api, admin_listener));
    if let (Some(listener), Some(address)) = (readiness_listener, readiness) {
        tracing::info!(%address, "readiness listening");
        tasks.spawn(readiness::serve(drain.clone(), listener));
    }
    if let (Some(listener), Some(address), Some(settings)) = (status_listener, status_addr, options.status) {
        tracing::info!(%address, probes = settings.probers.len(), "status listening");
        tasks.spawn(status::serve(Arc::new(settings), control.clone(), listener));
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let watcher = match file::watch_file(&path, tx) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
            None
        }
    };
    tasks.spawn(file::reload_loop(control.clone(), rx, RELOAD_DEBOUNCE));
    if let Some(d) = bootstrap.discovery {
        tasks.spawn(discovery::poll_loop(control.clone(), d));
    }
    tasks.spawn(interfaces::refresh(control.proxy.clone()));

    Ok(Bound {
        admin,
        readiness,
        status: status_addr,
        dns,
        listeners: control.listeners.bound(),
        control,
        drain,
        shutdown,
        _tasks: tasks,
        _watcher: watcher,
        data,
    })
}

async fn bind(field: &'static str, address: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(address).await.map_err(|error| bind_error(field, address, error))
}

fn bind_error(field: &'static str, address: SocketAddr, error: io::Error) -> Error {
    Error::Bind { field, address, error }
}

impl Bound {
    /// Serves until SIGTERM, SIGINT or `POST /quitquitquit`, then drains: listeners close,
    /// `/ready` turns 503, idle connections close, requests in flight finish, bounded by the
    /// bootstrap's `drain_timeout`.
    pub async fn wait_termination(self) -> Result<(), Error> {
        let listen = |kind: SignalKind, name| signal(kind).map_err(|error| Error::Signal { signal: name, error });
        let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
        let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = self.shutdown.notified() => "/quitquitquit",
        };
        let timeout = self.control.bootstrap.drain_timeout;
        tracing::info!(reason = why, ?timeout, "draining: no new connections");
        self.control.listeners.stop_all();
        if self.drain.drain(timeout).await {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(open = self.drain.holders(), "drain timeout: closing the remaining connections");
        }
        Ok(())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.control.listeners.stop_all();
        self.data.stop();
    }
}

/// The data-plane runtime, on threads of its own. One worker is a current-thread runtime on its
/// own thread: no work-stealing bookkeeping and an uncontended timer, which is what a sidecar on
/// one core wants; more workers are a multi-thread runtime, driven from a thread that only waits
/// for the stop (so it is shut down there, never inside the caller's async context).
struct DataPlane {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DataPlane {
    fn start(workers: usize) -> io::Result<Self> {
        let (rt, thread_name) = if workers > 1 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("mesh-proxy-worker")
                .enable_all()
                .build()?;
            (rt, "mesh-proxy-data")
        } else {
            (tokio::runtime::Builder::new_current_thread().enable_all().build()?, "mesh-proxy-worker")
        };
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name(thread_name.into()).spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        })?;
        Ok(Self { handle, stop: Some(stop), thread: Some(thread) })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        self.handle.clone()
    }

    /// Stops the runtime: connections still open are dropped. Waits at most ~100 ms.
    fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

//! A whole proxy, started and stopped: what `main` runs, and what a test starts in-process.
//!
//! Three runtimes, so that no side waits for another:
//! - the admin API and the readiness port run on a one-thread runtime of their own, started
//!   first: they answer from the moment [`build`] has bound them — `/ready` says 503
//!   `INITIALIZING` while the first config is built, and nothing a reload or a discovery poll
//!   does can delay an answer (a 10,000-route reload once held `/ready` for over a minute);
//! - [`build`] runs on the caller's runtime, which becomes the control runtime: reloads (built on
//!   a blocking thread), discovery and the interface refresh are spawned there;
//! - the data plane gets a runtime of its own, on threads of its own, so a saturated data plane
//!   never hides the admin port either.
//!
//! Everything is bound before [`build`] returns, and [`Bound`] says where, so a config may ask
//! for port 0.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{signal, SignalKind},
    sync::Notify,
    task::JoinSet,
};

use crate::{
    admin::{self, readiness::Health, status, Admin},
    config::Loaded,
    control::{discovery, file, interfaces, Control, UpdateError},
    data::{
        accept::{self, ListenerInfo},
        inbound::LocalAddrs,
    },
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
    /// Inbound arrives through mesh-init's TPROXY rules with this mark (`--inbound-tproxy-mark`,
    /// which `mesh-init inject` sets in TPROXY mode): every listener is transparent, whatever the
    /// config says.
    pub inbound_tproxy_mark: Option<u32>,
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
    #[error("building the first config panicked: {0}")]
    Panicked(String),
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
    data: Plane,
    admin_plane: Plane,
}

/// Binds everything `config` asks for and starts serving it.
pub async fn build(config: Loaded, options: Options) -> Result<Bound, Error> {
    let path = config.path.clone();
    let bootstrap = config.bootstrap.clone();
    let admin_socket = bind("admin.address", bootstrap.admin)?;
    let admin = admin_socket.local_addr().map_err(|error| bind_error("admin.address", bootstrap.admin, error))?;
    // The readiness port on `0.0.0.0` also listens on `[::]` where the namespace has IPv6, as
    // the listeners do: a kubelet probing the pod's IPv6 address must get an answer.
    let mut readiness_sockets = Vec::new();
    let mut readiness = None;
    if let Some(r) = bootstrap.readiness {
        let socket = bind("readiness.address", r.address)?;
        let bound = socket.local_addr().map_err(|error| bind_error("readiness.address", r.address, error))?;
        readiness_sockets.push((socket, bound));
        readiness = Some(bound);
        if r.address.ip() == IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
            let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), bound.port());
            match accept::bind(v6, true) {
                Ok(socket) => readiness_sockets.push((socket, v6)),
                Err(e) if accept::no_ipv6(&e) => tracing::debug!(error = %e, "no IPv6 readiness companion"),
                Err(error) => return Err(bind_error("readiness.address", v6, error)),
            }
        }
    }
    let (status_socket, status_addr) = match &options.status {
        Some(st) => {
            let socket = bind("--status-address", st.address)?;
            let bound = socket.local_addr().map_err(|error| bind_error("--status-address", st.address, error))?;
            (Some(socket), Some(bound))
        }
        None => (None, None),
    };

    let drain = Arc::new(drain::Trigger::default());
    let health = Arc::new(Health::new(drain.clone()));
    let shutdown = Arc::new(Notify::new());
    let api = Arc::new(Admin {
        control: OnceLock::new(),
        log: options.log,
        shutdown: shutdown.clone(),
        health: health.clone(),
        mutations: bootstrap.admin_mutations,
    });
    let admin_plane = Plane::start("mesh-proxy-admin", 1).map_err(Error::Runtime)?;
    {
        let _runtime = admin_plane.handle.enter();
        let listener = TcpListener::from_std(admin_socket).map_err(|e| bind_error("admin.address", admin, e))?;
        tracing::info!(address = %admin, workers = options.workers, "admin listening");
        admin_plane.handle.spawn(admin::serve(api.clone(), listener));
        for (socket, address) in readiness_sockets {
            let listener = TcpListener::from_std(socket).map_err(|e| bind_error("readiness.address", address, e))?;
            tracing::info!(%address, "readiness listening");
            admin_plane.handle.spawn(admin::readiness::serve(health.clone(), listener));
        }
    }

    let data = Plane::start(if options.workers > 1 { "mesh-proxy-data" } else { "mesh-proxy-worker" }, options.workers)
        .map_err(Error::Runtime)?;
    let local = LocalAddrs::discover().map_err(Error::LocalAddrs)?;
    let metrics = Arc::new(Metrics::new());
    let (handle, trigger) = (data.handle.clone(), drain.clone());
    // The first build, off the caller's runtime like every later one.
    let tproxy = options.inbound_tproxy_mark;
    let control =
        tokio::task::spawn_blocking(move || Control::start(config, admin, handle, trigger, local, metrics, tproxy))
            .await
            .map_err(|e| Error::Panicked(e.to_string()))??;
    let control = Arc::new(control);
    let dns = match bootstrap.dns.clone().or_else(|| options.dns_capture.then(Default::default)) {
        Some(settings) => dns::start(&settings, control.proxy.snapshot.clone(), control.metrics(), &data.handle)?,
        None => Vec::new(),
    };
    let _ = api.control.set(control.clone());
    health.serving();

    let mut tasks = JoinSet::new();
    tasks.spawn(file::reload_loop(control.clone(), path, RELOAD_DEBOUNCE));
    if let Some(d) = bootstrap.discovery {
        tasks.spawn(discovery::poll_loop(control.clone(), d));
    }
    tasks.spawn(interfaces::refresh(control.proxy.clone()));
    if let (Some(socket), Some(address), Some(settings)) = (status_socket, status_addr, options.status) {
        let listener = TcpListener::from_std(socket).map_err(|e| bind_error("--status-address", address, e))?;
        tracing::info!(%address, probes = settings.probers.len(), "status listening");
        tasks.spawn(status::serve(Arc::new(settings), control.clone(), listener));
    }

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
        data,
        admin_plane,
    })
}

/// A listening socket for the admin side, registered later on the runtime that serves it.
fn bind(field: &'static str, address: SocketAddr) -> Result<std::net::TcpListener, Error> {
    accept::bind(address, false).map_err(|error| bind_error(field, address, error))
}

fn bind_error(field: &'static str, address: SocketAddr, error: io::Error) -> Error {
    Error::Bind { field, address, error }
}

impl Bound {
    /// Serves until SIGTERM, SIGINT or `POST /quitquitquit`, then drains ([`drain`]): `/ready`
    /// turns 503 at once, listeners keep accepting and responses say `Connection: close`; the
    /// process exits once no connection is open after `drain_minimum`, or at `drain_timeout`.
    pub async fn wait_termination(self) -> Result<(), Error> {
        let listen = |kind: SignalKind, name| signal(kind).map_err(|error| Error::Signal { signal: name, error });
        let mut term = listen(SignalKind::terminate(), "SIGTERM")?;
        let mut int = listen(SignalKind::interrupt(), "SIGINT")?;
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = self.shutdown.notified() => "/quitquitquit",
        };
        let b = &self.control.bootstrap;
        let deadline = tokio::time::Instant::now() + b.drain_timeout;
        self.drain.start();
        tracing::info!(
            reason = why,
            timeout = ?b.drain_timeout,
            minimum = ?b.drain_minimum,
            open = self.drain.open(),
            "draining: /ready is 503, listeners still accept, connections are asked to close"
        );
        tokio::time::sleep(b.drain_minimum).await;
        let finished = tokio::time::timeout_at(deadline, self.drain.none_open()).await.is_ok();
        self.control.listeners.stop_all();
        if finished {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(open = self.drain.open(), "drain timeout: closing the remaining connections");
        }
        Ok(())
    }
}

impl Drop for Bound {
    fn drop(&mut self) {
        self.control.listeners.stop_all();
        self.data.stop();
        self.admin_plane.stop();
    }
}

/// A runtime on threads of its own: the data plane's, and the admin side's. One worker is a
/// current-thread runtime on its own thread: no work-stealing bookkeeping and an uncontended
/// timer, which is what a sidecar on one core wants; more workers are a multi-thread runtime,
/// driven from a thread that only waits for the stop (so it is shut down there, never inside the
/// caller's async context).
struct Plane {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Plane {
    fn start(thread_name: &str, workers: usize) -> io::Result<Self> {
        let rt = if workers > 1 {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("mesh-proxy-worker")
                .enable_all()
                .build()?
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?
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

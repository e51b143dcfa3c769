//! `mesh-proxy --config FILE [--workers N]`: see the crate docs and README.md.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use mesh_proxy::{
    admin::{self, readiness, Admin},
    config::RawConfig,
    control::{self, discovery, Control},
    data::{accept::Listeners, cluster::EndpointRegistry, inbound::LocalAddrs, Proxy},
    drain,
    logging::{self, LogFormat},
    metrics::Metrics,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::Notify,
};

/// How often the namespace's interface addresses are re-read (inbound detection).
const LOCAL_ADDRS_REFRESH: Duration = Duration::from_secs(5);
/// Quiet time after a file event before the file is read.
const RELOAD_DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, Parser)]
#[command(version, about = "The mesh's sidecar proxy")]
struct Args {
    /// Configuration file (YAML or JSON); reloaded on change and on SIGHUP.
    #[arg(short, long, env = "MESH_PROXY_CONFIG")]
    config: PathBuf,
    /// Data-plane threads [default: the number of cores].
    #[arg(long, env = "MESH_PROXY_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Log filter: a level or an EnvFilter string such as `info,access=off`.
    #[arg(long, env = "MESH_PROXY_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let log = match logging::init(&args.log_level, args.log_format) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mesh-proxy: --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    match run(args, log) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, log: logging::LogHandle) -> anyhow::Result<()> {
    let path = args.config;
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {}", path.display()))?;
    let raw = RawConfig::from_yaml(&path.display().to_string(), &text)?;
    let version = control::content_version(&text);
    let metrics = Arc::new(Metrics::new());
    let registry = EndpointRegistry::default();
    let snapshot = Control::first_snapshot(&path, &raw, version.clone(), &registry, &metrics)?;
    let drain_timeout = snapshot.load().config.drain_timeout;

    let workers = match args.workers {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let data = DataPlane::start(workers).context("starting the data-plane runtime")?;
    let control_rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the control runtime")?;

    control_rt.block_on(async {
        let local = LocalAddrs::discover().context("reading interface addresses")?;
        let proxy = Arc::new(Proxy::new(snapshot.clone(), metrics.clone(), local));
        let drain = Arc::new(drain::Trigger::default());
        let listeners = Listeners::new(data.handle(), proxy.clone(), drain.clone());
        let control = Arc::new(Control::start(path.clone(), raw, version, snapshot, metrics, listeners, registry)?);

        let admin_addr = control.snapshot.load().config.admin;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("binding admin.address {admin_addr}"))?;
        tracing::info!(address = %admin_addr, workers, "admin listening");
        let shutdown = Arc::new(Notify::new());
        let admin = Arc::new(Admin {
            control: control.clone(),
            log: Some(log),
            shutdown: shutdown.clone(),
            drain: drain.clone(),
        });
        tokio::spawn(admin::serve(admin, admin_listener));
        if let Some(ready) = control.snapshot.load().config.readiness {
            let listener = tokio::net::TcpListener::bind(ready.address)
                .await
                .with_context(|| format!("binding readiness.address {}", ready.address))?;
            tracing::info!(address = %ready.address, "readiness listening");
            tokio::spawn(readiness::serve(drain.clone(), listener));
        }

        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _watcher = match control::file::watch_file(&path, tx) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; reload with SIGHUP");
                None
            }
        };
        tokio::spawn(control::file::reload_loop(control.clone(), rx, RELOAD_DEBOUNCE));
        tokio::spawn(discovery::poll_loop(control.clone()));
        let refresher = proxy.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCAL_ADDRS_REFRESH).await;
                match LocalAddrs::discover() {
                    Ok(l) => refresher.local_addrs.store(Arc::new(l)),
                    Err(e) => tracing::warn!(error = %e, "re-reading interface addresses"),
                }
            }
        });

        let mut term = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = shutdown.notified() => "/quitquitquit",
        };
        // The drain timeout of the config in force, which a reload may have changed.
        let drain_timeout = control.snapshot.load().config.drain_timeout.max(Duration::ZERO);
        tracing::info!(reason = why, timeout = ?drain_timeout, "draining: no new connections");
        control.listeners.stop_all();
        if drain.drain(drain_timeout).await {
            tracing::info!("drained: every connection finished");
        } else {
            tracing::warn!(open = drain.holders(), "drain timeout: closing the remaining connections");
        }
        anyhow::Ok(())
    })?;
    let _ = drain_timeout;
    data.stop();
    Ok(())
}

/// The data-plane runtime. One worker is a current-thread runtime on its own thread: no
/// work-stealing bookkeeping and an uncontended timer, which is what a sidecar on one core wants;
/// more workers are a multi-thread runtime.
enum DataPlane {
    Single {
        handle: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
        thread: std::thread::JoinHandle<()>,
    },
    Multi(tokio::runtime::Runtime),
}

impl DataPlane {
    fn start(workers: usize) -> std::io::Result<Self> {
        if workers > 1 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("mesh-proxy-worker")
                .enable_all()
                .build()?;
            return Ok(Self::Multi(rt));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("mesh-proxy-worker".into()).spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            });
            rt.shutdown_timeout(Duration::from_millis(100));
        })?;
        Ok(Self::Single { handle, stop, thread })
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match self {
            Self::Single { handle, .. } => handle.clone(),
            Self::Multi(rt) => rt.handle().clone(),
        }
    }

    fn stop(self) {
        match self {
            Self::Single { stop, thread, .. } => {
                let _ = stop.send(());
                let _ = thread.join();
            }
            Self::Multi(rt) => rt.shutdown_timeout(Duration::from_millis(100)),
        }
    }
}

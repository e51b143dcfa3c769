//! `mesh-pilot`: the control plane's command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_pilot::{
    adapter::{files, kube},
    analysis::Level,
    app,
    model::{Registry, Store},
    status,
    translate::{Options, Translator, DEFAULT_ROOT_NAMESPACE},
};

#[derive(Parser)]
#[command(name = "mesh-pilot", version, about = "The mesh's control plane")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Watches the platform and serves every proxy its config.
    Serve {
        /// A directory of Kubernetes-format YAML (Services, EndpointSlices, Pods, Istio rules), watched.
        #[arg(long, value_name = "DIR", required_unless_present_any = ["kubernetes", "kubeconfig"], conflicts_with_all = ["kubernetes", "kubeconfig"])]
        config_dir: Option<PathBuf>,
        /// Watch a Kubernetes API server: in-cluster config, else $KUBECONFIG, else ~/.kube/config.
        #[arg(long)]
        kubernetes: bool,
        /// Watch the Kubernetes API server of this kubeconfig file.
        #[arg(long, value_name = "PATH")]
        kubeconfig: Option<PathBuf>,
        /// The version of Istio's CRDs to watch (v1 since Istio 1.22; v1beta1 before).
        #[arg(long, default_value = "v1")]
        istio_api_version: String,
        /// How often the Kubernetes watchers list everything again (repairs a missed event).
        #[arg(long, default_value = "5m", value_parser = duration)]
        resync: Duration,
        /// Discovery for the proxies (`discovery.url: http://ADDR/ns/<namespace>`); Istio's plaintext xDS port.
        #[arg(long, default_value = "0.0.0.0:15010")]
        listen: SocketAddr,
        /// /debug/* and /metrics; Istio's monitoring port, on loopback.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
        /// The listener every proxy is given (mesh-init's redirect port), or `none` to serve no
        /// listeners (each proxy's own file then keeps its listeners).
        #[arg(long, default_value = "0.0.0.0:15000")]
        proxy_listener: String,
        /// The cluster domain.
        #[arg(long, default_value = mesh_pilot::model::DEFAULT_DOMAIN)]
        domain: String,
        /// Where a Sidecar without a workload selector is every namespace's default.
        #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
        root_namespace: String,
        /// An `EnvFilter` string.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
    /// Istio's proxy-status table: per proxy and type, SYNCED, STALE, NOT SENT or ERROR (with the reason).
    Status {
        /// mesh-pilot's admin address.
        #[arg(long, default_value = "127.0.0.1:15014")]
        admin: SocketAddr,
    },
    /// Reports what Istio's analyzers would about a set of files (exit 1 when an error is found).
    Analyze {
        /// Files or directories of Kubernetes-format YAML (Services, EndpointSlices, Pods, Istio rules).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// `text` (istioctl's format with file and line) or `json`.
        #[arg(short, long, default_value = "text")]
        output: Output,
        /// The cluster domain.
        #[arg(long, default_value = mesh_pilot::model::DEFAULT_DOMAIN)]
        domain: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-pilot: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve {
            config_dir,
            kubernetes: _,
            kubeconfig,
            istio_api_version,
            resync,
            listen,
            admin,
            proxy_listener,
            domain,
            root_namespace,
            log_level,
        } => {
            tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_new(&log_level)?).init();
            let listener = match proxy_listener.as_str() {
                "none" => None,
                a => Some(a.parse().with_context(|| format!("--proxy-listener {a:?}: expected ip:port or none"))?),
            };
            let platform = match (config_dir, kubeconfig) {
                (Some(dir), _) => app::Platform::Files(dir),
                (None, path) => app::Platform::Kubernetes {
                    source: path.map_or(kube::Source::Infer, kube::Source::Kubeconfig),
                    istio_version: istio_api_version,
                    resync,
                },
            };
            let cfg = app::Config { platform, listen, admin, translate: Options { domain, root_namespace, listener } };
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(async {
                let bound = app::start(cfg).await?;
                tracing::info!(discovery = %bound.discovery, admin = %bound.admin, "mesh-pilot serving");
                println!("mesh-pilot: discovery on {}, admin on {}", bound.discovery, bound.admin);
                shutdown().await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { admin } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let body = rt.block_on(get(admin, "/debug/syncz"))?;
            let rows: Vec<status::Sync> = serde_json::from_slice(&body).context("reading /debug/syncz")?;
            print!("{}", status::table(&rows, &format!("mesh-pilot-{}", env!("CARGO_PKG_VERSION"))));
            Ok(ExitCode::SUCCESS)
        }
        Command::Analyze { files: paths, output, domain } => {
            let mut store = Store::default();
            store.apply(files::read(&paths).context("analyze")?);
            let opts = Options { domain, ..Options::default() };
            let registry = Registry::build(&store, &opts.domain);
            let findings = Translator::new(&store, &registry, &opts).analyze();
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
                Output::Text if findings.is_empty() => {
                    println!("✔ No validation issues found when analyzing {}", names(&paths))
                }
                Output::Text => findings.iter().for_each(|f| println!("{f}")),
            }
            let failed = findings.iter().any(|f| f.level == Level::Error);
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
    }
}

fn names(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// SIGTERM or Ctrl-C.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// One GET to mesh-pilot's admin server.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let fetch = async {
        let stream =
            tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to --admin {addr}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path).header(http::header::HOST, addr.to_string()).body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{path}: {status}: {}", String::from_utf8_lossy(&body).trim());
        }
        anyhow::Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .context("mesh-pilot's admin server did not answer in 10s")?
}

fn duration(s: &str) -> Result<Duration, String> {
    mesh_proxy::parse::duration(s)
}

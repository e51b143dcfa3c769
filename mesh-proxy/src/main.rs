//! `mesh-proxy --config FILE [--workers N] [--status-address ADDR] [--discovery-address ADDR]` and
//! `mesh-proxy wait`: see the crate docs and README.md.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context;
use clap::Parser;
use mesh_proxy::{
    admin::{self, status},
    app, config,
    logging::{self, LogFormat},
};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "The mesh's sidecar proxy",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Return once this pod's proxy answers GET /ready (the postStart hook of a held sidecar).
    Wait(WaitArgs),
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// The proxy's readiness port, on 127.0.0.1.
    #[arg(long, default_value_t = mesh_common::ports::READINESS)]
    readiness_port: u16,
    /// How long to wait (`600s`, `2m`): the injected startup probe's 10 minutes.
    #[arg(long, default_value = "600s", value_parser = mesh_proxy::parse::duration)]
    timeout: std::time::Duration,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// Configuration file (YAML or JSON); reloaded on change and on SIGHUP.
    #[arg(short, long, env = "MESH_PROXY_CONFIG", required = true)]
    config: Option<PathBuf>,
    /// Data-plane threads [default: the number of cores].
    #[arg(long, env = "MESH_PROXY_WORKERS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Log filter: a level or an EnvFilter string such as `info,access=off`.
    #[arg(long, env = "MESH_PROXY_LOG", default_value = "info")]
    log_level: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Serve the status port here (Istio's 15020): the application's probes and merged metrics,
    /// from the injector's ISTIO_KUBE_APP_PROBERS and ISTIO_PROMETHEUS_ANNOTATIONS.
    #[arg(long, env = "MESH_PROXY_STATUS_ADDRESS")]
    status_address: Option<SocketAddr>,
    /// The pod's IP, where the application's probes go (the downward API's status.podIP).
    #[arg(long, env = "INSTANCE_IP")]
    pod_ip: Option<IpAddr>,
    /// mesh-pilot's discovery address (`host:port`): the config is fetched from
    /// `http://ADDR/ns/<the pod's namespace>`, over the file's `discovery.url` (set by `mesh-init
    /// inject --discovery-address`).
    #[arg(long, env = "MESH_PROXY_DISCOVERY_ADDRESS")]
    discovery_address: Option<String>,
    /// The pod's namespace (the downward API's metadata.namespace): the discovery scope.
    #[arg(long, env = "POD_NAMESPACE")]
    pod_namespace: Option<String>,
    /// Serve DNS on 127.0.0.1:15053 and [::1]:15053 even if the config has no `dns` section: set
    /// by `mesh-init inject --redirect-dns`, whose rules send the pod's queries there.
    #[arg(long, env = "MESH_PROXY_DNS_CAPTURE")]
    dns_capture: bool,
    /// Inbound arrives through mesh-init's TPROXY rules (`-m TPROXY`) with this mark (their `-t`):
    /// every listener is transparent and hands inbound connections to the application from the
    /// client's address. Needs CAP_NET_ADMIN. Set by `mesh-init inject` in TPROXY mode.
    #[arg(long, env = "MESH_PROXY_INBOUND_TPROXY_MARK", value_parser = clap::value_parser!(u32).range(1..))]
    inbound_tproxy_mark: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Wait(w)) = cli.command {
        return wait(w);
    }
    let args = cli.args;
    let log = match logging::init(&args.log_level, args.log_format) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("mesh-proxy: --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    let result = run(args, log);
    // Access lines still batched (up to a second's worth) go out before the process does.
    logging::access::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn wait(args: WaitArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-proxy wait: starting a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interval = std::time::Duration::from_millis(200);
    match rt.block_on(admin::wait::wait_ready(args.readiness_port, args.timeout, interval)) {
        Ok(took) => {
            println!("mesh-proxy wait: ready after {took:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-proxy wait: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, log: logging::LogHandle) -> anyhow::Result<()> {
    let path = args.config.expect("clap requires --config without a subcommand");
    let overrides = match &args.discovery_address {
        Some(address) => config::Overrides::discovery_address(address, args.pod_namespace.as_deref())?,
        None => config::Overrides::default(),
    };
    let config = config::load(&path, &overrides)?;
    let status = match args.status_address {
        Some(address) => Some(status::Settings::new(
            address,
            std::env::var(status::PROBERS_ENV).ok().as_deref(),
            std::env::var(status::PROMETHEUS_ENV).ok().as_deref(),
            args.pod_ip,
        )?),
        None => None,
    };
    let workers = match args.workers {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // The control runtime: admin, reloads, discovery. The data plane gets its own in app::build.
    let control =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the control runtime")?;
    control.block_on(async {
        let options = app::Options {
            workers,
            log: Some(log),
            status,
            dns_capture: args.dns_capture,
            inbound_tproxy_mark: args.inbound_tproxy_mark,
        };
        let bound = app::build(config, options).await?;
        bound.wait_termination().await
    })?;
    Ok(())
}

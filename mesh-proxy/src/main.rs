//! `mesh-proxy --config FILE [--workers N]`: see the crate docs and README.md.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::Parser;
use mesh_proxy::{
    app, config,
    logging::{self, LogFormat},
};

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
    let config = config::load(&args.config)?;
    let workers = match args.workers {
        Some(n) => usize::from(n),
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // The control runtime: admin, reloads, discovery. The data plane gets its own in app::build.
    let control =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the control runtime")?;
    control.block_on(async {
        let bound = app::build(config, app::Options { workers, log: Some(log) }).await?;
        bound.wait_termination().await
    })?;
    Ok(())
}

//! `cargo xtask <task>`: the project's developer tasks.
//!
//! - `bench` ([`bench`]): the benchmark harness of issue 6 — proxy overhead against the direct
//!   path and HAProxy, eBPF against iptables, rule-install time; writes `bench/results.md` and
//!   `bench/latency.svg`.
//! - `bench-pilot` ([`pilot`]): mesh-pilot at scale (issue 15): 1,000 services, 2,000 simulated
//!   long-polling proxies, one endpoint change every 100 ms; writes `bench/pilot.md`.
//! - `config-scale` ([`scale`]): mesh-proxy loading and reloading 10,000 routes × 10 endpoints,
//!   and `/ready` meanwhile (issue 12).
//! - `soak` ([`soak`]): mesh-proxy for 10 minutes (2 with `--quick`) under a steady load, slow
//!   uploads, config rewrites every second, backend restarts and hostile clients (issue 12).
//! - `load-rate`, `load-idle` (hidden, [`load`]): load clients Debian lacks, started by `bench`
//!   inside a pod's namespace and cgroup.
//!
//! Modules: [`network`] (the backend and pod namespaces, on mesh-lab's guards), [`paths`] (direct, HAProxy,
//! mesh-proxy in iptables and eBPF modes), [`load`] (wrk, iperf3, our clients), [`rules`]
//! (batch vs per-rule install), [`report`] (markdown and SVG).

mod bench;
mod load;
mod network;
mod paths;
mod pilot;
mod report;
mod rules;
mod scale;
mod soak;

use std::{process::ExitCode, time::Duration};

use clap::Parser;

#[derive(Parser)]
#[command(name = "xtask", about = "Developer tasks of the mesh-init workspace")]
enum Cli {
    /// Benchmark the paths (direct, HAProxy, mesh-proxy with iptables and eBPF) and rule installs.
    Bench(bench::BenchArgs),
    /// mesh-pilot at scale: 1,000 services, 2,000 long-polling proxies, an endpoint change every 100 ms.
    BenchPilot(pilot::PilotArgs),
    /// mesh-proxy with a large config: start and reload times, `/ready` meanwhile.
    ConfigScale(scale::ScaleArgs),
    /// mesh-proxy for 10 minutes (2 with --quick) under load, reloads, backend restarts and hostile clients.
    Soak(soak::SoakArgs),
    /// Fixed-rate open-loop HTTP client; prints its result as JSON.
    #[command(hide = true)]
    LoadRate(load::RateArgs),
    /// Opens and holds idle connections until stdin closes.
    #[command(hide = true)]
    LoadIdle(load::IdleArgs),
}

/// A duration flag of the benchmarks: the mesh's grammar (`1.5s`, `100ms`, see
/// [`mesh_common::duration`]), or a bare number of seconds as the flags' defaults write them.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let d = match s.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => Duration::from_secs_f64(secs),
        _ => mesh_common::duration::parse(s).map_err(|e| format!("invalid duration {s:?}: {e}"))?,
    };
    if d.is_zero() {
        return Err(format!("invalid duration {s:?}: must be more than zero"));
    }
    Ok(d)
}

fn main() -> ExitCode {
    let result = match Cli::parse() {
        Cli::Bench(args) => mesh_lab::interrupt::install().and_then(|()| bench::run(args)),
        Cli::BenchPilot(args) => mesh_lab::interrupt::install().and_then(|()| pilot::run(args)),
        Cli::ConfigScale(args) => mesh_lab::interrupt::install().and_then(|()| scale::run(args)),
        Cli::Soak(args) => mesh_lab::interrupt::install().and_then(|()| soak::run(args)),
        Cli::LoadRate(args) => load::rate_client(&args).and_then(|r| {
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cli::LoadIdle(args) => load::idle_client(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! The `mesh-init` binary: the command line over the library. Errors become one readable
//! sentence and a non-zero exit here, and nowhere else.

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mesh_init::{
    capture::CaptureArgs,
    iptables::{self, Backend, BackendChoice, Installed, IptablesArgs},
    netns,
    rules::Family,
    validate,
};

#[derive(Parser)]
#[command(name = "mesh-init", version, about = "Transparent traffic interception for a service mesh sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log filter (tracing's env-filter syntax), e.g. `debug`.
    #[arg(long, global = true, env = "MESH_INIT_LOG", default_value = "info")]
    log_level: String,
    /// istio-iptables' log flag (`default:info`), accepted so Istio's injector template works.
    #[arg(long = "log_output_level", global = true, hide = true)]
    istio_log_level: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Write Istio-compatible iptables rules redirecting the pod's TCP traffic to the proxy.
    Iptables(IptablesCmd),
    /// Load eBPF programs that redirect the cgroup's TCP traffic to the proxy (no iptables).
    Ebpf(EbpfCmd),
    /// Prove, from inside the namespace, that outbound connections reach the redirect port with
    /// their original destination.
    Validate(ValidateCmd),
    /// Show what mesh-init has installed: iptables chains (in the namespace) and eBPF programs.
    Status(StatusCmd),
    /// Follow a packet through the rules the capture flags mean: which rules it meets, in which
    /// chain, and whether it is redirected, handed to TPROXY, marked or left alone. Needs no root.
    Trace(TraceCmd),
    /// Add the mesh-init init container and the mesh-proxy sidecar to Kubernetes workloads.
    Inject(mesh_init::inject::InjectArgs),
    /// Inject pods as the API server creates them: a mutating admission webhook over HTTPS.
    Webhook(mesh_init::webhook::WebhookArgs),
}

/// Selects the network namespace to work in.
#[derive(clap::Args)]
struct NetnsArg {
    /// Work inside this network namespace: a name from `ip netns list` or a path such as
    /// /proc/PID/ns/net. Preferred over `ip netns exec`, which hides cgroup2 and bpffs.
    #[arg(long = "netns", visible_alias = "network-namespace", env = "NETWORK_NAMESPACE")]
    netns: Option<String>,
}

impl NetnsArg {
    fn enter(&self) -> Result<()> {
        if let Some(ns) = &self.netns {
            netns::enter(ns)?;
        }
        Ok(())
    }
}

#[derive(clap::Args)]
struct IptablesCmd {
    #[command(flatten)]
    capture: CaptureArgs,
    #[command(flatten)]
    netns: NetnsArg,
    #[command(flatten)]
    iptables: IptablesArgs,
}

/// The eBPF mode keeps the project's defaults (one proxy port for both directions, everything
/// captured) rather than istio-iptables' (`-p 15001 -z 15006`, nothing captured).
#[derive(clap::Args)]
#[command(
    mut_arg("envoy_port", |a| a.default_value(mesh_common::ports::PROXY_TEXT)),
    mut_arg("inbound_capture_port", |a| a.default_value(None::<&'static str>)),
    mut_arg("service_cidr", |a| a.default_value("*")),
    mut_arg("inbound_ports", |a| a.default_value("*")),
)]
struct EbpfCmd {
    #[command(flatten)]
    capture: CaptureArgs,
    #[command(flatten)]
    netns: NetnsArg,
    #[cfg(feature = "ebpf")]
    #[command(flatten)]
    ebpf: mesh_init::ebpf::EbpfArgs,
    /// Everything else, so that the missing feature is reported instead of a flag error.
    #[cfg(not(feature = "ebpf"))]
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

#[derive(clap::Args)]
struct ValidateCmd {
    #[command(flatten)]
    capture: CaptureArgs,
    #[command(flatten)]
    netns: NetnsArg,
    /// An address that the rules must capture; the connection never leaves the host when they do.
    /// 192.0.2.1 is a documentation address (RFC 5737), routed nowhere.
    #[arg(long = "probe-address", default_value = "192.0.2.1:15099")]
    probe: Vec<SocketAddr>,
    /// How long to wait for the redirected connection.
    #[arg(long, default_value = "2s", value_parser = validate::parse_duration)]
    timeout: Duration,
}

#[derive(clap::Args)]
struct TraceCmd {
    #[command(flatten)]
    capture: CaptureArgs,
    #[command(flatten)]
    netns: NetnsArg,
    #[command(flatten)]
    trace: mesh_init::trace::TraceArgs,
}

#[derive(clap::Args)]
struct StatusCmd {
    #[command(flatten)]
    netns: NetnsArg,
    #[arg(long = "iptables-backend", value_enum, default_value = "auto")]
    backend: BackendChoice,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match &cli.istio_log_level {
        Some(istio) => istio.rsplit(':').next().unwrap_or("info").to_string(),
        None => cli.log_level.clone(),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-init: error: {e:#}");
            // istio-iptables' exit code for a failed validation, which the CNI plugin looks for.
            match e.downcast_ref::<iptables::Error>() {
                Some(iptables::Error::Validation(_)) => ExitCode::from(126),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Iptables(cmd) => run_iptables(cmd),
        Command::Ebpf(cmd) => run_ebpf(cmd),
        Command::Validate(cmd) => run_validate(cmd),
        Command::Status(cmd) => run_status(cmd),
        Command::Trace(cmd) => run_trace(cmd),
        Command::Inject(args) => Ok(mesh_init::inject::run(&args)?),
        Command::Webhook(args) => Ok(mesh_init::webhook::run(args)?),
    }
}

fn run_iptables(cmd: IptablesCmd) -> Result<()> {
    // Every flag is checked before anything, the namespace included, is touched.
    let capture = cmd.capture.validate_for(cmd.netns.netns.as_deref())?;
    cmd.netns.enter()?;
    Ok(iptables::run(&cmd.iptables, &capture, cmd.netns.netns.as_deref())?)
}

#[cfg(feature = "ebpf")]
fn run_ebpf(cmd: EbpfCmd) -> Result<()> {
    let capture = cmd.capture.validate()?;
    cmd.netns.enter()?;
    Ok(mesh_init::ebpf::run(&cmd.ebpf, &capture)?)
}

#[cfg(not(feature = "ebpf"))]
fn run_ebpf(_cmd: EbpfCmd) -> Result<()> {
    anyhow::bail!(
        "this mesh-init was built without the `ebpf` feature; rebuild with default features \
         (needs nightly rust-src and bpf-linker: run scripts/setup.sh), or use `mesh-init iptables`"
    )
}

fn run_validate(cmd: ValidateCmd) -> Result<()> {
    let capture = cmd.capture.validate_for(cmd.netns.netns.as_deref())?;
    cmd.netns.enter()?;
    for probe in &cmd.probe {
        let got = validate::outbound(capture.outbound_port, *probe, &capture.proxy_uids, cmd.timeout)
            .with_context(|| format!("validation of {probe} failed"))?;
        println!("ok: a connection to {probe} reached port {} with original destination {got}", capture.outbound_port);
    }
    Ok(())
}

fn run_trace(cmd: TraceCmd) -> Result<()> {
    let host = mesh_init::capture::System::new(cmd.capture.resolv_conf.as_deref(), cmd.netns.netns.as_deref());
    let capture = cmd.capture.validate_with(&host)?;
    if cmd.trace.live {
        cmd.netns.enter()?;
    }
    let mut out = String::new();
    mesh_init::trace::run(&cmd.trace, &capture, &host, &mut out)?;
    // A reader that stops early (`| head`) is not an error.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    Ok(())
}

fn run_status(cmd: StatusCmd) -> Result<()> {
    cmd.netns.enter()?;
    match Backend::select(cmd.backend) {
        Ok(backend) => {
            for family in [Family::V4, Family::V6] {
                let installed = Installed::read(backend, family)?;
                if installed.is_empty() {
                    println!("iptables {family} ({backend}): nothing installed");
                } else {
                    print!("iptables {family} ({backend}):\n{installed}");
                }
            }
        }
        Err(e) => println!("iptables: {e}"),
    }
    if iptables::nft_available() {
        for family in [Family::V4, Family::V6] {
            let installed = iptables::NftInstalled::read(family)?;
            if installed.rule_count() > 0 {
                print!("nftables {family} (native):\n{installed}");
            }
        }
    }
    #[cfg(feature = "ebpf")]
    mesh_init::ebpf::status(&mut std::io::stdout())?;
    Ok(())
}

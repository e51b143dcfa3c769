//! `mesh-init ebpf`: the iptables mode's interception without netfilter, by eBPF programs
//! attached to the pod's cgroup (outbound, `SO_ORIGINAL_DST`) and network namespace (inbound).
//!
//! Deciding, then doing, as in the iptables mode:
//! - [`plan`]: a [`CaptureConfig`] turned into the values of the configuration maps, or the flag
//!   this mode cannot honour (`crate::ebpf_limits`, shared with `inject`);
//! - [`probe`]: what the kernel must offer for the flags given, checked before anything is
//!   created;
//! - [`cgroup`]: finding the cgroup2 mount and checking `--cgroup` (never its root);
//! - [`pins`]: bpffs (mounted when absent) and the per-cgroup pin directory;
//! - [`attach`]: loading the object built from `mesh-ebpf` (only the programs the flags need),
//!   filling the maps (a new configuration generation, switched to at once), attaching and
//!   pinning (a re-run replaces each link in place and keeps the maps, so connections in flight
//!   keep their state), and `--cleanup-only`;
//! - [`listeners`]: the proxy's inbound listeners that were listening before the programs were
//!   attached, adopted into the listener map;
//! - [`status`](mod@status): what is pinned and attached, with map entry counts;
//! - [`log`]: `--log`, the programs' aya-log output in the foreground.
//!
//! The programs themselves, and why they work the way they do, are described in `mesh-ebpf`.

mod attach;
mod cgroup;
mod listeners;
mod log;
mod pins;
mod plan;
mod probe;
mod raw_link;
mod status;

use std::path::PathBuf;

pub use plan::MapPlan;

use crate::capture::CaptureConfig;

/// Flags of `mesh-init ebpf` besides the shared capture flags and `--netns` (main.rs handles
/// those, and has entered the namespace before [`run`] is called).
#[derive(Debug, Clone, clap::Args)]
pub struct EbpfArgs {
    /// The pod's cgroup v2 directory, e.g. /sys/fs/cgroup/kubepods.slice/.../pod<uid>. Required
    /// (except with --cleanup-only --all): mesh-init never attaches to the root cgroup.
    #[arg(long, env = "MESH_CGROUP", required_unless_present = "all")]
    pub cgroup: Option<PathBuf>,

    /// Detach and unpin everything mesh-init installed for --cgroup, and nothing else.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,

    /// With --cleanup-only and instead of --cgroup: every cgroup's interception under --bpffs.
    /// Explicit, because on a node that is every pod's.
    #[arg(long, requires = "cleanup_only", conflicts_with = "cgroup")]
    pub all: bool,

    /// While the proxy has no inbound listener (not started, crashed, restarting), hand
    /// captured inbound connections to the application instead of refusing them. Off by
    /// default: like the iptables mode, inbound fails closed, so the application is never
    /// reached without the proxy's policy.
    #[arg(long = "inbound-fail-open")]
    pub inbound_fail_open: bool,

    /// Stay in the foreground printing the programs' debug log until Ctrl-C (the programs
    /// stay attached afterwards; a killed reader's records stop within seconds).
    #[arg(long)]
    pub log: bool,

    /// Where bpffs is (mounted there if it is not).
    #[arg(long, env = "MESH_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
}

/// Why `mesh-init ebpf` or `status` failed. Each message names the flag or path at fault and
/// carries its cause in the text (causes are not chained as `source`, so that `{:#}` printing
/// does not repeat them).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Unsupported(#[from] crate::ebpf_limits::Unsupported),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Pins(#[from] pins::PinsError),
    #[error(transparent)]
    Attach(#[from] attach::AttachError),
    #[error(transparent)]
    Kernel(#[from] probe::Missing),
    #[error("the proxy's IPv6 passthrough source ::6: {0}")]
    Loopback(crate::iptables::Error),
    #[error(transparent)]
    Log(#[from] log::LogError),
    /// Not a `source`: the message carries the cause, and a chain would print it twice.
    #[error("writing the status: {0}")]
    Output(std::io::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Output(e)
    }
}

/// Installs (or re-installs, keeping the maps) the interception for `args.cgroup`, or removes it
/// with `--cleanup-only`. The current thread is already in the network namespace to work in.
///
/// Nothing is created before every check has passed: the flags, the kernel's features, the
/// cgroup, and (with inbound capture) that this is not the machine's own network namespace.
/// Only then is bpffs mounted if need be, the pin directory made, and `::6` put on `lo`.
pub fn run(args: &EbpfArgs, capture: &CaptureConfig) -> Result<(), Error> {
    if args.cleanup_only {
        return cleanup(args);
    }
    let plan = MapPlan::new(capture, args.inbound_fail_open)?;
    probe::check(&plan)?;
    let path = args.cgroup.as_deref().expect("clap requires --cgroup without --cleanup-only");
    let cgroup = cgroup::Cgroup::open(path)?;
    if plan.inbound {
        cgroup::refuse_host_netns()?;
    }
    let bpffs = pins::Bpffs::ensure(&args.bpffs)?;
    let fresh = !bpffs.dir_for(&cgroup.name).exists();
    let dir = bpffs.create_dir_for(&cgroup.name)?;
    let mut loaded = match attach::install(&dir, &cgroup, &plan) {
        Ok(loaded) => loaded,
        Err(e) => {
            // A first install that failed half way leaves nothing; a re-run that failed leaves
            // the previous, working installation as it was.
            if fresh {
                let _ = attach::cleanup(&dir);
            }
            return Err(e.into());
        }
    };
    if plan.inbound {
        // The proxy hands inbound connections to the application from ::6 (IPv6 is always
        // captured in this mode). A namespace without IPv6 cannot take it and needs no IPv6
        // passthrough source either: a warning, not a failure.
        if let Err(e) = crate::loopback::add_passthrough_v6() {
            tracing::warn!("IPv6 inbound passthrough source ::6: {e}");
        }
        let adopted = listeners::adopt(&mut loaded.ebpf, &cgroup, plan.config.inbound_port);
        if adopted > 0 {
            say(format_args!(
                "mesh-init ebpf: {adopted} listener(s) already on port {} will take inbound connections",
                plan.config.inbound_port
            ));
        }
    }
    say(format_args!(
        "mesh-init ebpf: {} cgroup {} (pinned in {}): outbound -> port {}, inbound -> port {}{}",
        if loaded.kept { "configuration updated, same programs stay attached to" } else { "attached to" },
        cgroup.path.display(),
        dir.display(),
        plan.config.outbound_port,
        plan.config.inbound_port,
        if args.inbound_fail_open { " (fail-open)" } else { "" },
    ));
    if args.log {
        log::follow(&mut loaded)?;
    }
    Ok(())
}

/// `--cleanup-only`: the pins, and `::6` on `lo` unless this is the machine's own network
/// namespace, whose `lo` mesh-init never changes (and whose `::6`, if any, is not ours).
fn cleanup(args: &EbpfArgs) -> Result<(), Error> {
    let bpffs = pins::Bpffs::ensure(&args.bpffs)?;
    let removed = match &args.cgroup {
        Some(path) => {
            let name = cgroup::Cgroup::name_for_cleanup(path)?;
            attach::cleanup(&bpffs.dir_for(&name))?
        }
        None => attach::cleanup_all(&bpffs)?,
    };
    for dir in removed {
        say(format_args!("mesh-init ebpf: removed {}", dir.display()));
    }
    if !cgroup::in_host_netns()? {
        crate::loopback::remove_passthrough_v6().map_err(Error::Loopback)?;
    }
    Ok(())
}

/// One line on stdout. The work is done by then: a reader that went away (a closed pipe) is no
/// reason to fail, let alone panic as `println!` would.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Lists what mesh-init has pinned and attached, for every cgroup, under every bpffs mount.
pub fn status(out: &mut dyn std::io::Write) -> Result<(), Error> {
    status::write(out)
}

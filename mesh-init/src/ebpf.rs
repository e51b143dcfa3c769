//! `mesh-init ebpf`: the iptables mode's interception without netfilter, by eBPF programs
//! attached to the pod's cgroup (outbound, `SO_ORIGINAL_DST`) and network namespace (inbound).
//!
//! Deciding, then doing, as in the iptables mode:
//! - [`plan`]: a [`CaptureConfig`] turned into the values of the configuration maps, or the flag
//!   this mode cannot honour (`crate::ebpf_limits`, shared with `inject`);
//! - [`cgroup`]: finding the cgroup2 mount and checking `--cgroup` (never its root);
//! - [`pins`]: bpffs (mounted when absent) and the per-cgroup pin directory;
//! - [`attach`]: loading the object built from `mesh-ebpf`, filling the maps, attaching and
//!   pinning (a re-run replaces each link in place and keeps the maps, so connections in flight
//!   keep their entries), and `--cleanup-only`;
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

    /// Pass data between the application and the proxy on loopback with sockmap (sk_msg),
    /// skipping the TCP stack. Off by default: sockmap has had kernel bugs.
    #[arg(long)]
    pub accelerate: bool,

    /// Stay in the foreground printing the programs' debug log until Ctrl-C (the programs
    /// stay attached afterwards).
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
/// with `--cleanup-only`.
pub fn run(args: &EbpfArgs, capture: &CaptureConfig) -> Result<(), Error> {
    let bpffs = pins::Bpffs::ensure(&args.bpffs)?;
    if args.cleanup_only {
        let removed = match &args.cgroup {
            Some(path) => {
                let name = cgroup::Cgroup::name_for_cleanup(path)?;
                attach::cleanup(&bpffs.dir_for(&name))?
            }
            None => attach::cleanup_all(&bpffs)?,
        };
        for dir in removed {
            println!("mesh-init ebpf: removed {}", dir.display());
        }
        return Ok(());
    }
    let plan = MapPlan::new(capture, args.accelerate)?;
    let path = args.cgroup.as_deref().expect("clap requires --cgroup without --cleanup-only");
    let cgroup = cgroup::Cgroup::open(path)?;
    if plan.inbound {
        cgroup::refuse_host_netns()?;
    }
    let dir = bpffs.create_dir_for(&cgroup.name)?;
    let mut loaded = attach::install(&dir, &cgroup, &plan, args.log)?;
    if plan.inbound {
        let adopted = listeners::adopt(&mut loaded.ebpf, &cgroup, plan.config.inbound_port);
        if adopted > 0 {
            println!(
                "mesh-init ebpf: {adopted} listener(s) already on port {} will take inbound connections",
                plan.config.inbound_port
            );
        }
    }
    println!(
        "mesh-init ebpf: {} cgroup {} (pinned in {}): outbound -> port {}, inbound -> port {}{}",
        if loaded.kept { "configuration updated, same programs stay attached to" } else { "attached to" },
        cgroup.path.display(),
        dir.display(),
        plan.config.outbound_port,
        plan.config.inbound_port,
        if args.accelerate { ", loopback accelerated" } else { "" },
    );
    if args.log {
        log::follow(&mut loaded)?;
    }
    Ok(())
}

/// Lists what mesh-init has pinned and attached, for every cgroup, under every bpffs mount.
pub fn status(out: &mut dyn std::io::Write) -> Result<(), Error> {
    status::write(out)
}

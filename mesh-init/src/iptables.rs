//! Applying a rules [`Plan`](crate::rules::Plan) to the kernel, atomically.
//!
//! Every change — first install, re-run with other flags, cleanup — is one
//! `iptables-restore --noflush` transaction per IP family: the removal of whatever mesh-init left
//! before (found with `iptables-save`) followed by the new rules. Either the whole transaction
//! commits or the kernel keeps exactly the rules it had. Only chains mesh-init owns and the jumps
//! into them are ever touched; foreign rules stay where they are.

mod backend;
mod nft;
mod state;

use std::{
    io::Write,
    process::{Command, Stdio},
};

use clap::ArgAction;

pub use backend::{Backend, BackendChoice};
pub use nft::{available as nft_available, NftInstalled};
pub use state::Installed;

use crate::{
    capture::{go_bool, CaptureConfig},
    route,
    rules::{self, Family, Plan},
};

/// Flags of `mesh-init iptables` besides the shared capture flags and `--netns` (main.rs handles
/// those, and has entered the namespace before [`run`] is called). Names, environment variables
/// and defaults are istio-iptables'.
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// Print the iptables-restore input that would be applied (per family) and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub dry_run: bool,
    /// Remove every chain and jump mesh-init owns, and nothing else.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub cleanup_only: bool,
    /// Also program ip6tables (automatic when the namespace has a global IPv6 address; also set by
    /// ISTIO_DUAL_STACK).
    #[arg(long = "dual-stack", env = "DUAL_STACK", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub dual_stack: bool,
    /// Which iptables to use; `auto` (or empty) follows the rules already present, as kube-proxy does.
    #[arg(
        long = "iptables-backend",
        visible_alias = "force-iptables-binary",
        env = "FORCE_IPTABLES_BINARY",
        value_parser = BackendChoice::parse,
        default_value = "auto"
    )]
    pub backend: BackendChoice,
    /// Do not install anything (with --run-validation: only validate, as istio-validation does).
    #[arg(long = "skip-rule-apply", env = "SKIP_RULE_APPLY", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub skip_rule_apply: bool,
    /// After installing, prove that the proxy's own connections to the pod are redirected:
    /// listen on --envoy-port and --inbound-capture-port on loopback, connect to 127.0.0.6 on
    /// --iptables-probe-port, and exit with 126 if the connection does not arrive. Run it as the
    /// proxy's UID, as istio-validation does.
    #[arg(long = "run-validation", env = "RUN_VALIDATION", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub run_validation: bool,
    /// The port --run-validation connects to.
    #[arg(long = "iptables-probe-port", env = "IPTABLES_PROBE_PORT", default_value = "15002")]
    pub probe_port: u16,
    /// How long --run-validation waits for its connection (`5s`, `500ms`).
    #[arg(long = "probe-timeout", env = "PROBE_TIMEOUT", default_value = "5s", value_parser = crate::validate::parse_duration)]
    pub probe_timeout: std::time::Duration,
    /// Running from the CNI plugin on the node: iptables locks the pod's namespace file instead of
    /// the node's /run/xtables.lock (which kube-proxy holds). Needs --netns.
    #[arg(long = "cni-mode", env = "CNI_MODE", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub cni_mode: bool,
    /// Write native nftables rules (tables `istio-proxy-nat`, `-mangle`, `-raw` of family ip and
    /// ip6) with `nft -f`, instead of iptables rules.
    #[arg(long = "native-nftables", env = "NATIVE_NFTABLES", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub native_nftables: bool,
    /// istio-iptables' switch to replace rules that differ from the wanted ones. mesh-init always
    /// does that, in one transaction, so this is accepted and changes nothing.
    #[arg(long = "reconcile", env = "RECONCILE", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub reconcile: bool,
    /// istio-iptables' switch to apply even when the rules look current. mesh-init always
    /// applies, so this is accepted and changes nothing.
    #[arg(long = "force-apply", env = "FORCE_APPLY", action = ArgAction::SetTrue, value_parser = go_bool)]
    pub force_apply: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no iptables binary found ({tried}); install the Debian package `iptables` (apt-get install iptables)")]
    NotInstalled { tried: String },
    #[error("--iptables-backend {0}: `{1}` is not installed; install the Debian package `iptables`, or choose another backend")]
    BackendMissing(BackendChoice, String),
    #[error("cannot run `{cmd}`: {cause}")]
    Spawn { cmd: String, cause: std::io::Error },
    #[error("`{cmd}` failed ({status}); the kernel's {family} rules are unchanged:\n{stderr}")]
    Restore { cmd: String, family: Family, status: std::process::ExitStatus, stderr: String },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command { cmd: String, status: std::process::ExitStatus, stderr: String },
    #[error(
        "--native-nftables: `nft` is not installed; install the Debian package `nftables` (apt-get install nftables)"
    )]
    NftMissing,
    #[error("--cni-mode: the pod's xtables lock is its namespace file; give --netns (--network-namespace)")]
    CniModeWithoutNetns,
    #[error(transparent)]
    Flag(#[from] crate::capture::InvalidFlag),
    /// The exit code of istio-iptables' validation failure is 126; main uses it for this one.
    #[error("iptables validation failed; the pod is not ready for the mesh: {0}")]
    Validation(#[from] crate::validate::ValidationError),
}

/// What an apply or cleanup did, for the user.
#[derive(Debug)]
pub struct Outcome {
    pub family: Family,
    /// Rules of a previous run that this transaction replaced or removed.
    pub removed: usize,
    pub added: usize,
}

/// Installs `capture` (or prints it with `--dry-run`, or removes everything with
/// `--cleanup-only`) in the current network namespace, which is `netns` (as given to `--netns`)
/// when set; then validates with `--run-validation`.
pub fn run(args: &IptablesArgs, capture: &CaptureConfig, netns: Option<&str>) -> Result<(), Error> {
    if args.cni_mode {
        let path = netns.map(crate::netns::path_of).ok_or(Error::CniModeWithoutNetns)?;
        // Read by iptables 1.8.6+ (legacy; nf_tables takes no lock): every child inherits it.
        std::env::set_var("XTABLES_LOCKFILE", path);
    }
    if args.reconcile || args.force_apply {
        tracing::debug!("--reconcile/--force-apply: mesh-init always replaces its rules in one transaction");
    }
    if !args.skip_rule_apply {
        install(args, capture)?;
    }
    if args.run_validation {
        let ports = [capture.outbound_port, capture.inbound_port];
        let got = crate::validate::istio_probe(&ports, args.probe_port, args.probe_timeout)?;
        println!("validation: a connection to {got} was redirected to the proxy's port");
    }
    Ok(())
}

fn install(args: &IptablesArgs, capture: &CaptureConfig) -> Result<(), Error> {
    let dual_stack = args.dual_stack || env_flag("ISTIO_DUAL_STACK")?;
    let mut families = vec![Family::V4];
    if dual_stack || crate::has_global_ipv6() {
        families.push(Family::V6);
    }
    if args.dry_run {
        let mut text = String::new();
        for family in families {
            let plan = rules::plan(capture, family);
            if args.native_nftables {
                text += &format!("# {family}: nft -f -\n");
                text += &rules::render_nft(&plan);
            } else {
                let restore = if family == Family::V4 { "iptables-restore" } else { "ip6tables-restore" };
                text += &format!("# {family}: {restore} --noflush\n");
                text += &rules::render(&plan);
            }
        }
        // A reader that stops early (`| head`) is not an error.
        let _ = std::io::stdout().write_all(text.as_bytes());
        return Ok(());
    }
    let writer = if args.native_nftables { Writer::Nftables } else { Writer::Iptables(Backend::select(args.backend)?) };
    tracing::info!(%writer, "rules backend");
    if args.cleanup_only {
        // Whatever the backend: rules of ours from a run with the other one go too.
        for family in [Family::V4, Family::V6] {
            let done = writer.cleanup(family)?;
            println!("{family}: removed {} mesh-init rules ({writer})", done.removed);
            for other in writer.others() {
                let done = other.cleanup(family)?;
                if done.removed > 0 {
                    println!("{family}: removed {} mesh-init rules ({other})", done.removed);
                }
            }
        }
        crate::loopback::remove_passthrough_v6()?;
        return Ok(());
    }
    for family in [Family::V4, Family::V6] {
        // Rules a run with the other backend left would fight these: they go first.
        for other in writer.others() {
            let done = other.cleanup(family)?;
            if done.removed > 0 {
                println!("{family}: removed {} rules of a previous run ({other})", done.removed);
            }
        }
        if families.contains(&family) {
            let done = writer.apply(&rules::plan(capture, family))?;
            if family == Family::V6 {
                crate::loopback::add_passthrough_v6()?;
            }
            println!("{family}: {} rules in place, {} replaced ({writer})", done.added, done.removed);
        } else {
            // A previous dual-stack run may have left IPv6 rules that this run no longer wants.
            let done = writer.cleanup(family)?;
            if done.removed > 0 {
                println!("{family}: removed {} rules of a previous run ({writer})", done.removed);
            }
        }
    }
    Ok(())
}

/// Where the rules are written: an iptables flavour, or nftables itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    Iptables(Backend),
    Nftables,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::Iptables(b) => write!(f, "{b}"),
            Writer::Nftables => f.write_str("native nftables"),
        }
    }
}

impl Writer {
    fn apply(self, plan: &Plan) -> Result<Outcome, Error> {
        match self {
            Writer::Iptables(b) => apply(b, plan),
            Writer::Nftables => nft::apply(plan),
        }
    }

    fn cleanup(self, family: Family) -> Result<Outcome, Error> {
        match self {
            Writer::Iptables(b) => cleanup(b, family),
            Writer::Nftables => nft::cleanup(family),
        }
    }

    /// The other backends whose rules of ours may be installed, where their tools exist.
    fn others(self) -> Vec<Writer> {
        match self {
            Writer::Iptables(_) => nft::available().then_some(Writer::Nftables).into_iter().collect(),
            Writer::Nftables => Backend::installed().into_iter().map(Writer::Iptables).collect(),
        }
    }
}

/// A boolean environment variable istio-iptables reads besides a flag's own (`ISTIO_DUAL_STACK`).
fn env_flag(name: &'static str) -> Result<bool, Error> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => {
            go_bool(&v).map_err(|reason| Error::Flag(crate::capture::InvalidFlag { flag: name, value: v, reason }))
        }
        _ => Ok(false),
    }
}

/// Replaces whatever mesh-init installed for `plan.family` with `plan`, in one transaction.
pub fn apply(backend: Backend, plan: &Plan) -> Result<Outcome, Error> {
    let installed = Installed::read(backend, plan.family)?;
    restore(backend, plan.family, &installed.transaction(plan))?;
    if plan.tproxy_route.is_some() || installed.tproxy_mark().is_some() {
        route::reconcile(plan.family, plan.tproxy_route, installed.tproxy_mark())?;
    }
    Ok(Outcome { family: plan.family, removed: installed.rule_count(), added: plan.rule_count() })
}

/// Removes every chain and jump mesh-init owns for `family`, and nothing else.
pub fn cleanup(backend: Backend, family: Family) -> Result<Outcome, Error> {
    let installed = Installed::read(backend, family)?;
    let empty = Plan { family, tables: Default::default(), tproxy_route: None };
    if !installed.is_empty() {
        restore(backend, family, &installed.transaction(&empty))?;
    }
    if let Some(mark) = installed.tproxy_mark() {
        route::reconcile(family, None, Some(mark))?;
    }
    Ok(Outcome { family, removed: installed.rule_count(), added: 0 })
}

/// Feeds `text` to `iptables-restore --noflush`. Both backends commit table by table, so a
/// transaction over several tables is first run with `--test`: one that would fail half-way (a
/// missing match module in the mangle table, say) is caught before any table changes. A single
/// table commits atomically on its own and needs no rehearsal.
fn restore(backend: Backend, family: Family, text: &str) -> Result<(), Error> {
    let bin = backend.restore_binary(family);
    tracing::debug!(%bin, "transaction:\n{text}");
    let tables = text.lines().filter(|l| l.starts_with('*')).count();
    let test: &[&str] = &["--noflush", "--wait", "--test"];
    let commit: &[&str] = &["--noflush", "--wait"];
    let passes = if tables > 1 { vec![test, commit] } else { vec![commit] };
    for args in passes {
        let cmd = format!("{bin} {}", args.join(" "));
        let mut child = Command::new(&bin)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|cause| Error::Spawn { cmd: cmd.clone(), cause })?;
        // A write error means the child died early; its status and stderr say why.
        let _ = child.stdin.take().expect("piped").write_all(text.as_bytes());
        let out = child.wait_with_output().map_err(|cause| Error::Spawn { cmd: cmd.clone(), cause })?;
        if !out.status.success() {
            return Err(Error::Restore {
                cmd,
                family,
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

pub(crate) fn command(bin: &str, args: &[&str]) -> Result<String, Error> {
    let cmd = format!("{bin} {}", args.join(" "));
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|cause| Error::Spawn { cmd: cmd.clone(), cause })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

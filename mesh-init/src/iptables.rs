//! Applying a rules [`Plan`](crate::rules::Plan) to the kernel, atomically.
//!
//! Every change — first install, re-run with other flags, cleanup — is one
//! `iptables-restore --noflush` transaction per IP family: the removal of whatever mesh-init left
//! before (found with `iptables-save`) followed by the new rules. Either the whole transaction
//! commits or the kernel keeps exactly the rules it had. Only chains mesh-init owns and the jumps
//! into them are ever touched; foreign rules stay where they are.

mod backend;
mod state;

use std::{
    io::Write,
    process::{Command, Stdio},
};

pub use backend::{Backend, BackendChoice};
pub use state::Installed;

use crate::{
    capture::CaptureConfig,
    rules::{self, Family, Plan, TproxyRoute},
};

/// Flags of `mesh-init iptables` besides the shared capture flags and `--netns` (main.rs handles
/// those, and has entered the namespace before [`run`] is called).
#[derive(Debug, Clone, clap::Args)]
pub struct IptablesArgs {
    /// Print the iptables-restore input that would be applied (per family) and change nothing.
    #[arg(short = 'n', long = "dry-run", env = "DRY_RUN")]
    pub dry_run: bool,
    /// Remove every chain and jump mesh-init owns, and nothing else.
    #[arg(long = "cleanup-only", env = "CLEANUP_ONLY")]
    pub cleanup_only: bool,
    /// Also program ip6tables (automatic when the namespace has a global IPv6 address).
    #[arg(long = "dual-stack", env = "DUAL_STACK")]
    pub dual_stack: bool,
    /// Which iptables to use; `auto` follows the rules already present, as kube-proxy does.
    #[arg(
        long = "iptables-backend",
        visible_alias = "force-iptables-binary",
        env = "IPTABLES_BACKEND",
        value_enum,
        default_value = "auto"
    )]
    pub backend: BackendChoice,
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
}

/// What an apply or cleanup did, for the user.
#[derive(Debug)]
pub struct Outcome {
    pub family: Family,
    pub backend: Backend,
    /// Rules of a previous run that this transaction replaced or removed.
    pub removed: usize,
    pub added: usize,
}

/// Installs `capture` (or prints it with `--dry-run`, or removes everything with
/// `--cleanup-only`) in the current network namespace.
pub fn run(args: &IptablesArgs, capture: &CaptureConfig) -> Result<(), Error> {
    let mut families = vec![Family::V4];
    if args.dual_stack || crate::has_global_ipv6() {
        families.push(Family::V6);
    }
    if args.dry_run {
        let mut text = String::new();
        for family in families {
            let restore = if family == Family::V4 { "iptables-restore" } else { "ip6tables-restore" };
            text += &format!("# {family}: {restore} --noflush\n");
            text += &rules::render(&rules::plan(capture, family));
        }
        // A reader that stops early (`| head`) is not an error.
        let _ = std::io::stdout().write_all(text.as_bytes());
        return Ok(());
    }
    let backend = Backend::select(args.backend)?;
    tracing::info!(%backend, "iptables backend");
    if args.cleanup_only {
        for family in [Family::V4, Family::V6] {
            let done = cleanup(backend, family)?;
            println!("{family}: removed {} mesh-init rules ({backend})", done.removed);
        }
        crate::loopback::remove_passthrough_v6()?;
        return Ok(());
    }
    for family in [Family::V4, Family::V6] {
        if families.contains(&family) {
            let done = apply(backend, &rules::plan(capture, family))?;
            if family == Family::V6 {
                crate::loopback::add_passthrough_v6()?;
            }
            println!("{family}: {} rules in place, {} replaced ({backend})", done.added, done.removed);
        } else {
            // A previous dual-stack run may have left IPv6 rules that this run no longer wants.
            let done = cleanup(backend, family)?;
            if done.removed > 0 {
                println!("{family}: removed {} rules of a previous run ({backend})", done.removed);
            }
        }
    }
    Ok(())
}

/// Replaces whatever mesh-init installed for `plan.family` with `plan`, in one transaction.
pub fn apply(backend: Backend, plan: &Plan) -> Result<Outcome, Error> {
    let installed = Installed::read(backend, plan.family)?;
    restore(backend, plan.family, &installed.transaction(plan))?;
    if plan.tproxy_route.is_some() || installed.has_tproxy() {
        Route { family: plan.family }.reconcile(plan.tproxy_route)?;
    }
    Ok(Outcome { family: plan.family, backend, removed: installed.rule_count(), added: plan.rule_count() })
}

/// Removes every chain and jump mesh-init owns for `family`, and nothing else.
pub fn cleanup(backend: Backend, family: Family) -> Result<Outcome, Error> {
    let installed = Installed::read(backend, family)?;
    let empty = Plan { family, tables: Default::default(), tproxy_route: None };
    if !installed.is_empty() {
        restore(backend, family, &installed.transaction(&empty))?;
    }
    if installed.has_tproxy() {
        Route { family }.reconcile(None)?;
    }
    Ok(Outcome { family, backend, removed: installed.rule_count(), added: 0 })
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

/// The policy route of the TPROXY mode: marked packets are delivered locally.
struct Route {
    family: Family,
}

impl Route {
    fn ip(&self, args: &[&str]) -> Result<String, Error> {
        let mut full = vec![if self.family == Family::V4 { "-4" } else { "-6" }];
        full.extend_from_slice(args);
        command("ip", &full)
    }

    /// Makes the policy route of the TPROXY mode exist exactly once when `want` is set, and not at
    /// all otherwise. Only mesh-init's own mark/table pair is ever touched.
    fn reconcile(&self, want: Option<TproxyRoute>) -> Result<(), Error> {
        let owned = rules::TPROXY_ROUTE;
        let (mark, table) = (owned.mark.to_string(), owned.table.to_string());
        let listing = self.ip(&["rule", "show"])?;
        let present = listing.lines().filter(|l| state::parse_tproxy_rule(l) == Some(owned)).count();
        let wanted = usize::from(want.is_some());
        for _ in wanted..present {
            self.ip(&["rule", "del", "fwmark", &mark, "lookup", &table])?;
        }
        if want.is_some() {
            if present == 0 {
                self.ip(&["rule", "add", "fwmark", &mark, "lookup", &table])?;
            }
            self.ip(&["route", "replace", "local", "default", "dev", "lo", "table", &table])?;
        } else if present > 0 {
            self.ip(&["route", "flush", "table", &table])?;
        }
        Ok(())
    }
}

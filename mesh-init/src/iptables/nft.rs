//! The native nftables backend (`--native-nftables`): the plan rendered as an `nft -f` script
//! ([`rules::render_nft`]) and committed in one transaction that first removes our tables of
//! that family (whatever a previous run left: another `-b`, TPROXY, DNS) and then creates them.
//! nftables commits a whole file or nothing, so a failure leaves the previous rules in place.

use std::{
    io::Write,
    process::{Command, Stdio},
};

use super::{Error, Outcome};
use crate::{
    route,
    rules::{self, Family, Owned, Plan, Table, Target},
};

const NFT: &str = "nft";

/// What of ours is installed for one family, read back with `nft -j list table`.
pub struct NftInstalled {
    pub plan: Plan,
    /// Rules in our tables that are not mesh-init's vocabulary.
    pub unknown: Vec<String>,
}

impl NftInstalled {
    pub fn read(family: Family) -> Result<NftInstalled, Error> {
        let fam = rules::nft_family(family);
        // One listing of the family's tables first: most runs find none of ours.
        let tables = nft(&["list", "tables", fam], None)?;
        let mut json = String::new();
        for table in Table::ALL {
            if tables.lines().any(|l| l.trim() == format!("table {fam} {}", table.nft_name())) {
                json += &nft(&["-j", "list", "table", fam, table.nft_name()], None)?;
            }
        }
        let (plan, unknown) = rules::parse_nft_json(family, &json);
        Ok(NftInstalled { plan, unknown })
    }

    pub fn rule_count(&self) -> usize {
        self.plan.rule_count() + self.unknown.len()
    }

    /// The mark of the installed TPROXY rule, if any: its policy route is ours to reconcile.
    pub fn tproxy_mark(&self) -> Option<u32> {
        self.plan.table(Table::Mangle).rules.iter().find_map(|r| match r.target {
            Target::Tproxy { mark, .. } if r.chain == rules::Chain::Owned(Owned::Tproxy) => Some(mark),
            _ => None,
        })
    }
}

impl std::fmt::Display for NftInstalled {
    /// One line per table and chain of ours with its rule count, as `mesh-init status` shows it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fam = rules::nft_family(self.plan.family);
        for table in Table::ALL {
            let tp = self.plan.table(table);
            let base = [rules::Chain::Prerouting, rules::Chain::Output];
            let chains = base.into_iter().chain(tp.chains.iter().map(|o| rules::Chain::Owned(*o)));
            for chain in chains {
                let n = tp.rules.iter().filter(|r| r.chain == chain).count();
                if n > 0 || matches!(chain, rules::Chain::Owned(_)) {
                    writeln!(f, "  {fam} {} {}: {n} rules", table.nft_name(), chain.nft_name())?;
                }
            }
        }
        for rule in &self.unknown {
            writeln!(f, "  not mesh-init's: {rule}")?;
        }
        Ok(())
    }
}

/// Replaces our tables of `plan.family` with `plan`, in one `nft -f` transaction.
pub fn apply(plan: &Plan) -> Result<Outcome, Error> {
    let installed = NftInstalled::read(plan.family)?;
    let script = rules::render_nft_removal(plan.family) + &rules::render_nft(plan);
    nft(&["-f", "-"], Some(&script))?;
    if plan.tproxy_route.is_some() || installed.tproxy_mark().is_some() {
        route::reconcile(plan.family, plan.tproxy_route, installed.tproxy_mark())?;
    }
    Ok(Outcome { family: plan.family, removed: installed.rule_count(), added: plan.rule_count() })
}

/// Removes our tables of `family`, and nothing else.
pub fn cleanup(family: Family) -> Result<Outcome, Error> {
    let installed = NftInstalled::read(family)?;
    if installed.plan.rule_count() == 0 && installed.plan.tables.iter().all(|t| t.chains.is_empty()) {
        return Ok(Outcome { family, removed: 0, added: 0 });
    }
    nft(&["-f", "-"], Some(&rules::render_nft_removal(family)))?;
    if let Some(mark) = installed.tproxy_mark() {
        route::reconcile(family, None, Some(mark))?;
    }
    Ok(Outcome { family, removed: installed.rule_count(), added: 0 })
}

/// Whether the `nft` tool is installed.
pub fn available() -> bool {
    super::backend::find(NFT).is_some()
}

/// Runs `nft ARGS` (with `stdin` for `-f -`); its stdout.
fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let cmd = format!("{NFT} {}", args.join(" "));
    let mut child = Command::new(super::backend::resolve(NFT))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|cause| match cause.kind() {
            std::io::ErrorKind::NotFound => Error::NftMissing,
            _ => Error::Spawn { cmd: cmd.clone(), cause },
        })?;
    if let Some(text) = stdin {
        tracing::debug!("nft transaction:\n{text}");
        // A write error means nft died early; its status and stderr say why.
        let _ = child.stdin.take().expect("piped").write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|cause| Error::Spawn { cmd: cmd.clone(), cause })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

//! Rule installation time: `mesh-init iptables` (one `iptables-restore --noflush` batch) against
//! the same rules applied one `iptables` call at a time, as istio-iptables does, each in a fresh
//! namespace. The per-rule script is rendered from `mesh-init iptables --dry-run` for that same
//! namespace, so both sides install exactly the same rules; the harness checks that they did.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};

use mesh_lab::{run, Netns, TempDir};

/// A set of flags to install.
pub struct RuleCase {
    pub name: &'static str,
    pub args: Vec<String>,
    /// The goal for the batch install, in milliseconds.
    pub goal_ms: f64,
}

pub fn cases() -> Vec<RuleCase> {
    // Spread out so that mesh-init can neither merge the ports into ranges nor the CIDRs into
    // supernets (the same sets as the e2e scale test).
    let ports: Vec<String> = (0..1000).map(|i| (20000 + 3 * i).to_string()).collect();
    let cidrs: Vec<String> = (0..1000).map(|i| format!("10.{}.{}.128/25", 100 + i / 250, i % 250)).collect();
    vec![
        RuleCase { name: "default rules", args: vec!["-i".into(), "*".into(), "-b".into(), "*".into()], goal_ms: 50.0 },
        RuleCase {
            name: "1,000 excluded ports + 1,000 excluded CIDRs",
            args: vec![
                "-i".into(),
                "*".into(),
                "-b".into(),
                "*".into(),
                "-o".into(),
                ports.join(","),
                "-x".into(),
                cidrs.join(","),
            ],
            goal_ms: 200.0,
        },
    ]
}

/// One measurement of a case.
pub struct RuleSample {
    pub batch: Duration,
    /// None when the per-rule replay was skipped for this repeat (it is slow by nature).
    pub per_rule: Option<Duration>,
    /// `-A` rules installed (both ways: checked equal).
    pub rules: usize,
    /// `iptables` invocations of the per-rule replay (chain creations included).
    pub calls: usize,
    /// "nft" or "legacy", as mesh-init reported it.
    pub backend: String,
}

pub fn measure(mesh_init: &Path, case: &RuleCase, per_rule: bool) -> Result<RuleSample> {
    let dir = TempDir::new("bench-tmp");
    // Batch: wall time of the whole command, process start and backend detection included.
    let ns = Netns::new("bench-rules");
    let t = Instant::now();
    let summary = stdout(Command::new(mesh_init).args(["iptables", "--netns", ns.name()]).args(&case.args))?;
    let batch = t.elapsed();
    let backend = if summary.contains("(legacy)") { "legacy" } else { "nft" }.to_string();
    let rules = count_rules(&ns, &backend)?;

    // Rendered for a namespace like the one it is replayed in (no IPv6 address: IPv4 only).
    let fresh = Netns::new("bench-rules");
    let dry =
        stdout(Command::new(mesh_init).args(["iptables", "--dry-run", "--netns", fresh.name()]).args(&case.args))?;
    let (script, calls) = per_rule_script(&dry, &format!("iptables-{backend}"))?;
    let script = dir.write("per-rule.sh", &script);
    let per_rule = if per_rule {
        let t = Instant::now();
        run(fresh.command("sh").arg(&script), Duration::from_secs(600))?;
        let elapsed = t.elapsed();
        let replayed = count_rules(&fresh, &backend)?;
        ensure!(replayed == rules, "{}: the per-rule replay installed {replayed} rules, mesh-init {rules}", case.name);
        Some(elapsed)
    } else {
        None
    };
    Ok(RuleSample { batch, per_rule, rules, calls, backend })
}

/// What a mesh-init or iptables command printed; it fails with its output when it fails.
fn stdout(cmd: &mut Command) -> Result<String> {
    Ok(String::from_utf8_lossy(&run(cmd, Duration::from_secs(60))?.stdout).into_owned())
}

fn count_rules(ns: &Netns, backend: &str) -> Result<usize> {
    let save = stdout(ns.command(format!("iptables-{backend}-save")).args(["-t", "nat"]))?;
    Ok(save.lines().filter(|l| l.starts_with("-A ")).count())
}

/// `iptables-restore` input (IPv4 section) → a shell script of single `iptables` calls: `-N` for
/// each user chain, then each `-A` line as it stands.
fn per_rule_script(restore: &str, iptables: &str) -> Result<(String, usize)> {
    let mut script = String::from("set -e\n");
    let mut calls = 0;
    let mut table = None;
    for line in restore.lines() {
        if line.starts_with("# IPv6") {
            break;
        }
        if let Some(t) = line.strip_prefix('*') {
            table = Some(t.to_string());
        } else if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().context("empty chain line")?;
            if !["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"].contains(&name) {
                script += &format!("{iptables} -w -t {} -N {name}\n", table.as_deref().context("chain before table")?);
                calls += 1;
            }
        } else if line.starts_with("-A ") {
            script += &format!("{iptables} -w -t {} {line}\n", table.as_deref().context("rule before table")?);
            calls += 1;
        }
    }
    ensure!(calls > 0, "no rules in the dry run");
    Ok((script, calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_rule_script_creates_chains_then_appends() {
        let dry = "# IPv4: iptables-restore --noflush\n*nat\n:ISTIO_OUTPUT - [0:0]\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j ISTIO_OUTPUT\nCOMMIT\n# IPv6: ip6tables-restore --noflush\n*nat\n-A OUTPUT -j X\n";
        let (script, calls) = per_rule_script(dry, "iptables-nft").unwrap();
        assert_eq!(calls, 2);
        assert_eq!(
            script,
            "set -e\niptables-nft -w -t nat -N ISTIO_OUTPUT\niptables-nft -w -t nat -A OUTPUT -p tcp -j ISTIO_OUTPUT\n"
        );
    }
}

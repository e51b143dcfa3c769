//! What mesh-init has installed already, read back from `iptables-save`.
//!
//! The removal half of every transaction is derived from this: jumps from the kernel's chains
//! into our chains are deleted by their exact saved text, our chains are flushed and, when the
//! new plan no longer needs them, deleted. Foreign chains and rules are never named.

use std::collections::BTreeMap;

use super::{Backend, Error};
use crate::rules::{self, Family, Owned, Plan, Table};

#[derive(Debug, Default)]
struct TableState {
    /// Our chains that exist, and how many rules each holds.
    chains: BTreeMap<Owned, usize>,
    /// Rules in the kernel's chains that jump into ours, as saved (`-A PREROUTING ...`).
    jumps: Vec<String>,
}

/// mesh-init's footprint in one family's tables.
#[derive(Debug)]
pub struct Installed {
    tables: BTreeMap<Table, TableState>,
    /// The mark of an installed TPROXY rule: its policy route is ours to reconcile.
    tproxy_mark: Option<u32>,
}

impl Installed {
    pub fn read(backend: Backend, family: Family) -> Result<Installed, Error> {
        let saved = super::command(&backend.save_binary(family), &[])?;
        Ok(Installed::parse(&saved))
    }

    pub fn parse(saved: &str) -> Installed {
        let mut tables: BTreeMap<Table, TableState> = BTreeMap::new();
        let mut current: Option<Table> = None;
        let mut tproxy_mark = None;
        for line in saved.lines() {
            if let Some(name) = line.strip_prefix('*') {
                current = Table::ALL.into_iter().find(|t| t.name() == name);
                continue;
            }
            let Some(table) = current else { continue };
            let state = tables.entry(table).or_default();
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if let Some(owned) = Owned::from_name(name) {
                    state.chains.entry(owned).or_default();
                }
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                if let Some(owned) = Owned::from_name(chain) {
                    *state.chains.entry(owned).or_default() += 1;
                    if owned == Owned::Tproxy {
                        tproxy_mark = tproxy_mark.or_else(|| saved_tproxy_mark(rule));
                    }
                } else if jump_target(rule).is_some_and(|t| Owned::from_name(t).is_some()) {
                    state.jumps.push(rule.to_string());
                }
            }
        }
        Installed { tables, tproxy_mark }
    }

    /// The mark of the installed TPROXY rule, if any (its policy route then needs reconciling).
    pub fn tproxy_mark(&self) -> Option<u32> {
        self.tproxy_mark
    }

    pub fn is_empty(&self) -> bool {
        self.tables.values().all(|t| t.chains.is_empty() && t.jumps.is_empty())
    }

    pub fn rule_count(&self) -> usize {
        self.tables.values().map(|t| t.jumps.len() + t.chains.values().sum::<usize>()).sum()
    }

    /// The lines that, in `table`'s block of a transaction installing `plan`, remove what was
    /// installed before: jumps from the kernel's chains, then our chains `plan` does not re-create
    /// (flushed first, since one of ours may reference another). Chains `plan` re-creates are
    /// emptied by their declaration in the same block.
    pub fn removal(&self, table: Table, plan: &Plan) -> Vec<String> {
        let Some(state) = self.tables.get(&table) else { return Vec::new() };
        let wanted = &plan.table(table).chains;
        let unwanted: Vec<Owned> = state.chains.keys().copied().filter(|c| !wanted.contains(c)).collect();
        let mut lines: Vec<String> = state.jumps.iter().map(|j| format!("-D {j}")).collect();
        lines.extend(unwanted.iter().map(|c| format!("-F {}", c.name())));
        lines.extend(unwanted.iter().map(|c| format!("-X {}", c.name())));
        lines
    }

    /// The whole transaction: our previous footprint replaced by `plan`.
    pub fn transaction(&self, plan: &Plan) -> String {
        rules::render_transaction(plan, |t| self.removal(t, plan))
    }
}

impl std::fmt::Display for Installed {
    /// One line per owned chain (`nat ISTIO_OUTPUT: 9 rules`) and per jump into them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (table, state) in &self.tables {
            for (chain, n) in &state.chains {
                writeln!(f, "  {} {}: {n} rules", table.name(), chain.name())?;
            }
            for jump in &state.jumps {
                writeln!(f, "  {} -A {jump}", table.name())?;
            }
        }
        Ok(())
    }
}

/// The chain a saved rule jumps or goes to, if any.
fn jump_target(rule: &str) -> Option<&str> {
    let mut words = rule.split_whitespace();
    while let Some(w) = words.next() {
        if w == "-j" || w == "-g" {
            return words.next();
        }
    }
    None
}

/// The mark of a saved TPROXY rule (`... -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff`).
fn saved_tproxy_mark(rule: &str) -> Option<u32> {
    let mut words = rule.split_whitespace();
    words.find(|w| *w == "--tproxy-mark")?;
    let value = words.next()?.split('/').next()?;
    match value.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => value.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVED: &str = "\
# Generated by iptables-nft-save
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:FOREIGN - [0:0]
:ISTIO_INBOUND - [0:0]
:ISTIO_REDIRECT - [0:0]
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A PREROUTING -p tcp -j FOREIGN
-A OUTPUT -p tcp -m tcp --dport 9 -j ACCEPT
-A ISTIO_INBOUND -p tcp -j ISTIO_REDIRECT
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15000
-A FOREIGN -j RETURN
COMMIT
";

    #[test]
    fn finds_only_our_chains_and_jumps() {
        let i = Installed::parse(SAVED);
        assert_eq!(i.rule_count(), 3);
        let nat = &i.tables[&Table::Nat];
        assert_eq!(nat.jumps, vec!["PREROUTING -p tcp -j ISTIO_INBOUND"]);
        assert_eq!(nat.chains.keys().copied().collect::<Vec<_>>(), vec![Owned::Inbound, Owned::Redirect]);
    }

    #[test]
    fn removal_deletes_jumps_flushes_then_deletes_unwanted_chains() {
        let i = Installed::parse(SAVED);
        let empty = Plan { family: Family::V4, tables: Default::default(), tproxy_route: None };
        assert_eq!(
            i.transaction(&empty),
            "*nat\n-D PREROUTING -p tcp -j ISTIO_INBOUND\n-F ISTIO_INBOUND\n-F ISTIO_REDIRECT\n\
             -X ISTIO_INBOUND\n-X ISTIO_REDIRECT\nCOMMIT\n"
        );
    }

    #[test]
    fn finds_the_tproxy_mark() {
        let saved =
            "*mangle\n:ISTIO_TPROXY - [0:0]\n-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 \
                     --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff\nCOMMIT\n";
        assert_eq!(Installed::parse(saved).tproxy_mark(), Some(1337));
        assert_eq!(Installed::parse(SAVED).tproxy_mark(), None);
    }
}

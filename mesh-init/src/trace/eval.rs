//! Following a packet through a [`Plan`], as netfilter would: raw, mangle and nat, in the hook the
//! packet meets (OUTPUT for what the pod sends, PREROUTING for what arrives). nat is consulted
//! for the first packet of a connection only.
//!
//! Targets behave as in the kernel: RETURN leaves the chain (from a built-in chain: the table is
//! done); ACCEPT ends the table; REDIRECT and TPROXY end it with their effect; DROP ends
//! everything; MARK, CONNMARK and CT set what they set and evaluation goes on, and CT's zone is
//! only taken for a packet that has none yet.

use std::fmt;

use super::packet::{Direction, Packet};
use crate::rules::{Chain, CtState, Match, Owner, Plan, Rule, Table, Target};

/// What happened to the packet: every effect, in a fixed order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// The conntrack zone it was put in (raw CT).
    pub zone: Option<u16>,
    /// Its firewall mark, when changed.
    pub mark: Option<u32>,
    /// Its connection's mark, when changed.
    pub connmark: Option<u32>,
    /// Handed to the transparent listener on this port (mangle TPROXY).
    pub tproxy: Option<u16>,
    /// Redirected to this local port (nat REDIRECT).
    pub redirect: Option<u16>,
    pub dropped: bool,
}

impl fmt::Display for Verdict {
    /// `zone=2 redirect=15053`, `mark=1337 tproxy=15006`, `accept` when nothing changed: the form
    /// the conformance tests compare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(z) = self.zone {
            parts.push(format!("zone={z}"));
        }
        if let Some(m) = self.mark {
            parts.push(format!("mark={m}"));
        }
        if let Some(m) = self.connmark {
            parts.push(format!("connmark={m}"));
        }
        if let Some(p) = self.tproxy {
            parts.push(format!("tproxy={p}"));
        }
        if let Some(p) = self.redirect {
            parts.push(format!("redirect={p}"));
        }
        if self.dropped {
            parts.push("drop".into());
        }
        if parts.is_empty() {
            f.write_str("accept")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// A rule the packet matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub table: Table,
    /// The rule's 1-based position in its chain, as `iptables -L --line-numbers` counts.
    pub position: usize,
    pub rule: Rule,
}

/// The tables the packet met, in order, each with the rules it matched there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trace {
    pub tables: Vec<(Table, Vec<Step>)>,
    /// nat was skipped: the packet belongs to an established connection (or was dropped).
    pub nat_skipped: bool,
    pub verdict: Verdict,
}

/// Where evaluation of a chain ended.
enum Flow {
    /// Fell off the end or RETURNed: the caller goes on.
    Continue,
    /// ACCEPT, REDIRECT or TPROXY: this table is done.
    Stop,
    /// DROP: everything is done.
    Drop,
}

struct State<'a> {
    pkt: Packet,
    table: Table,
    plan: &'a Plan,
    steps: Vec<Step>,
    verdict: Verdict,
}

/// Follows `pkt` through `plan` (whose family is the packet's).
pub fn evaluate(plan: &Plan, pkt: &Packet) -> Trace {
    let hook = match pkt.direction {
        Direction::Outbound => Chain::Output,
        Direction::Inbound => Chain::Prerouting,
    };
    let mut st = State { pkt: pkt.clone(), table: Table::Raw, plan, steps: Vec::new(), verdict: Verdict::default() };
    let mut tables = Vec::new();
    let mut nat_skipped = false;
    for table in Table::ALL {
        if table == Table::Nat && (pkt.state != CtState::New || st.verdict.dropped) {
            nat_skipped = true;
            continue;
        }
        if st.verdict.dropped {
            continue;
        }
        st.table = table;
        if let Flow::Drop = st.chain(hook) {
            st.verdict.dropped = true;
        }
        tables.push((table, std::mem::take(&mut st.steps)));
    }
    let mut verdict = st.verdict;
    verdict.mark = (st.pkt.mark != pkt.mark).then_some(st.pkt.mark);
    verdict.connmark = (st.pkt.connmark != pkt.connmark).then_some(st.pkt.connmark);
    Trace { tables, nat_skipped, verdict }
}

impl State<'_> {
    fn chain(&mut self, chain: Chain) -> Flow {
        let rules: Vec<&Rule> = self.plan.table(self.table).rules.iter().filter(|r| r.chain == chain).collect();
        for (i, rule) in rules.into_iter().enumerate() {
            if !rule.matches.iter().all(|m| matches(m, &self.pkt)) {
                continue;
            }
            self.steps.push(Step { table: self.table, position: i + 1, rule: rule.clone() });
            match rule.target {
                Target::Jump(to) => match self.chain(Chain::Owned(to)) {
                    Flow::Continue => {}
                    done => return done,
                },
                Target::Return => return Flow::Continue,
                Target::Accept => return Flow::Stop,
                Target::Drop => return Flow::Drop,
                Target::Redirect { port } => {
                    self.verdict.redirect = Some(port);
                    return Flow::Stop;
                }
                Target::Tproxy { port, mark } => {
                    self.pkt.mark = mark;
                    self.verdict.tproxy = Some(port);
                    return Flow::Stop;
                }
                Target::Mark(mark) => self.pkt.mark = mark,
                Target::SaveMark => self.pkt.connmark = self.pkt.mark,
                Target::RestoreMark => self.pkt.mark = self.pkt.connmark,
                Target::ConntrackZone(zone) => {
                    self.verdict.zone.get_or_insert(zone);
                }
            }
        }
        Flow::Continue
    }
}

fn matches(m: &Match, p: &Packet) -> bool {
    let outbound = p.direction == Direction::Outbound;
    match m {
        Match::Protocol(proto) => p.proto == *proto,
        Match::InInterface(i) => !outbound && p.in_iface == *i,
        Match::OutInterface(i) => outbound && p.out_iface == *i,
        Match::Source(net) => p.src.is_some_and(|s| net.contains(&s)),
        Match::Destination { net, negate } => net.contains(&p.dst) != *negate,
        Match::DestinationPorts { ports, negate } => {
            ports.iter().any(|&(a, b)| (a..=b).contains(&p.dst_port)) != *negate
        }
        Match::SourcePort(port) => p.src_port == Some(*port),
        Match::Owner { owner, negate } => {
            let is = outbound
                && match owner {
                    Owner::Uid(u) => p.uid == *u,
                    Owner::Gid(g) => p.gid == *g,
                };
            is != *negate
        }
        Match::Conntrack(states) => states.contains(&p.state),
        Match::Mark { mark, negate } => (p.mark == *mark) != *negate,
        Match::ConnMark(mark) => p.connmark == *mark,
    }
}

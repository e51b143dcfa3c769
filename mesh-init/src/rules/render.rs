//! Rendering a plan as `iptables-restore` input: the only place that knows iptables' syntax.

use std::fmt::Write;

use super::{Chain, Match, Owner, Plan, Protocol, Rule, Table, Target};

/// The `iptables-restore --noflush` text that makes `plan` true on a namespace where mesh-init
/// has installed nothing: what `--dry-run` prints and golden files hold.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    if let Some(r) = plan.tproxy_route {
        let ip = if plan.family == super::Family::V4 { "ip -4" } else { "ip -6" };
        writeln!(out, "# with the policy route: {ip} rule add fwmark {} lookup {}", r.mark, r.table).unwrap();
        writeln!(out, "#                        {ip} route replace local default dev lo table {}", r.table).unwrap();
    }
    out + &render_transaction(plan, |_| Vec::new())
}

/// Like [`render`], with `before(table)` lines placed in each table's block after the chain
/// declarations and before the new rules. Removal of a previous run goes there, so each table
/// changes in a single commit: a `:CHAIN` declaration creates the chain or empties it.
pub fn render_transaction(plan: &Plan, before: impl Fn(Table) -> Vec<String>) -> String {
    let mut out = String::new();
    for table in Table::ALL {
        let tp = plan.table(table);
        let prelude = before(table);
        if tp.chains.is_empty() && tp.rules.is_empty() && prelude.is_empty() {
            continue;
        }
        writeln!(out, "*{}", table.name()).unwrap();
        for chain in &tp.chains {
            writeln!(out, ":{} - [0:0]", chain.name()).unwrap();
        }
        for line in prelude {
            writeln!(out, "{line}").unwrap();
        }
        for rule in &tp.rules {
            writeln!(out, "-A {}", render_rule(rule)).unwrap();
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// One rule without the `-A`: `CHAIN matches... -j TARGET ...`.
pub fn render_rule(rule: &Rule) -> String {
    let mut s = String::from(rule.chain.name());
    for m in &rule.matches {
        s.push(' ');
        render_match(&mut s, m);
    }
    s.push(' ');
    render_target(&mut s, &rule.target);
    s
}

fn render_ports(s: &mut String, ranges: &[(u16, u16)]) {
    for (i, (a, b)) in ranges.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if a == b {
            write!(s, "{a}").unwrap();
        } else {
            write!(s, "{a}:{b}").unwrap();
        }
    }
}

fn render_match(s: &mut String, m: &Match) {
    match m {
        Match::Protocol(Protocol::Tcp) => s.push_str("-p tcp"),
        Match::Protocol(Protocol::Udp) => s.push_str("-p udp"),
        Match::InInterface(i) => write!(s, "-i {i}").unwrap(),
        Match::OutInterface(i) => write!(s, "-o {i}").unwrap(),
        Match::Source(net) => write!(s, "-s {net}").unwrap(),
        Match::Destination { net, negate } => write!(s, "{}-d {net}", bang(*negate)).unwrap(),
        Match::DestinationPorts { ports, negate } => {
            if let [_] = ports.as_slice() {
                write!(s, "{}--dport ", bang(*negate)).unwrap();
            } else {
                write!(s, "-m multiport {}--dports ", bang(*negate)).unwrap();
            }
            render_ports(s, ports);
        }
        Match::SourcePort(p) => write!(s, "--sport {p}").unwrap(),
        Match::Owner { owner, negate } => {
            let (kind, id) = match owner {
                Owner::Uid(u) => ("uid", u),
                Owner::Gid(g) => ("gid", g),
            };
            write!(s, "-m owner {}--{kind}-owner {id}", bang(*negate)).unwrap()
        }
        Match::Conntrack(states) => {
            let names: Vec<&str> = states.iter().map(|c| c.name()).collect();
            write!(s, "-m conntrack --ctstate {}", names.join(",")).unwrap()
        }
        Match::Mark { mark, negate } => write!(s, "-m mark {}--mark {mark}", bang(*negate)).unwrap(),
        Match::ConnMark(mark) => write!(s, "-m connmark --mark {mark}").unwrap(),
    }
}

fn render_target(s: &mut String, t: &Target) {
    match t {
        Target::Jump(c) => write!(s, "-j {}", Chain::Owned(*c).name()).unwrap(),
        Target::Return => s.push_str("-j RETURN"),
        Target::Accept => s.push_str("-j ACCEPT"),
        Target::Drop => s.push_str("-j DROP"),
        Target::Redirect { port } => write!(s, "-j REDIRECT --to-ports {port}").unwrap(),
        Target::Tproxy { port, mark } => {
            write!(s, "-j TPROXY --on-port {port} --tproxy-mark {mark}/0xffffffff").unwrap()
        }
        Target::Mark(m) => write!(s, "-j MARK --set-mark {m}").unwrap(),
        Target::SaveMark => s.push_str("-j CONNMARK --save-mark"),
        Target::RestoreMark => s.push_str("-j CONNMARK --restore-mark"),
        Target::ConntrackZone(z) => write!(s, "-j CT --zone {z}").unwrap(),
    }
}

fn bang(negate: bool) -> &'static str {
    if negate {
        "! "
    } else {
        ""
    }
}

//! Deciding the rules: Istio's capture semantics, as data.
//!
//! The order of `ISTIO_OUTPUT` is the heart of it and follows istio-iptables:
//! excluded ports, the proxy's inbound passthrough (127.0.0.6), the proxy's own traffic per UID
//! and GID (to its own pod through `lo` → inbound; the application calling itself through `lo` →
//! untouched; anything else the proxy sends → untouched), loopback, excluded CIDRs, and finally
//! what is captured.
//!
//! Where we differ from istio-iptables, on purpose:
//! - port lists are packed into `multiport` matches (consecutive ports become one `a:b` range),
//!   and CIDR lists are aggregated, so 1,000 ports stay a few dozen rules;
//! - excluded interfaces RETURN at the top of our own chains instead of from PREROUTING/OUTPUT, so
//!   the kernel's chains only ever hold jumps into chains we own — that is what makes cleanup exact;
//! - `-c` excludes an interface in both directions (inbound and outbound);
//! - with an explicit inbound port list, the proxy calling its own pod through `lo` is only sent
//!   to the inbound port for those ports, and not at all when inbound capture is off.

use ipnet::IpNet;

use super::{Chain, Family, Match, Owned, Owner, Plan, Protocol, Rule, Table, TablePlan, Target, TproxyRoute};
use crate::capture::{CaptureConfig, InboundMode, Selection};

/// iptables' `multiport` accepts at most 15 ports, a range counting as two.
const MULTIPORT_MAX: usize = 15;
/// The firewall mark and routing table of the TPROXY path (Istio's values).
const TPROXY_MARK: u32 = 1337;
pub const TPROXY_ROUTE: TproxyRoute = TproxyRoute { mark: TPROXY_MARK, table: 133 };
/// Conntrack zones keeping the proxy's upstream DNS queries apart from the application's.
const DNS_ZONE_UPSTREAM: u16 = 1;
const DNS_ZONE_PROXY_REPLIES: u16 = 2;

/// Builds the plan for one family.
pub fn plan(cfg: &CaptureConfig, family: Family) -> Plan {
    let mut b = Builder { cfg, family, plan: empty(family) };
    b.outbound();
    match cfg.inbound_mode {
        InboundMode::Redirect => b.inbound_redirect(),
        InboundMode::Tproxy => b.inbound_tproxy(),
    }
    if let Some(port) = cfg.dns_port {
        b.dns(port);
    }
    b.plan
}

fn empty(family: Family) -> Plan {
    Plan { family, tables: Default::default(), tproxy_route: None }
}

struct Builder<'a> {
    cfg: &'a CaptureConfig,
    family: Family,
    plan: Plan,
}

/// A destination port match: one port, one range, or a multiport list.
pub(super) type PortRanges = Vec<(u16, u16)>;

impl Builder<'_> {
    fn table(&mut self, t: Table) -> &mut TablePlan {
        self.plan.table_mut(t)
    }

    fn chain(&mut self, t: Table, c: Owned) {
        self.table(t).chains.insert(c);
    }

    fn rule(&mut self, t: Table, chain: Chain, matches: Vec<Match>, target: Target) {
        self.table(t).rules.push(Rule { chain, matches, target });
    }

    fn inbound_captured(&self) -> bool {
        match &self.cfg.include_inbound_ports {
            Selection::All => true,
            Selection::Only(ports) => ports.iter().any(|p| !self.cfg.exclude_inbound_ports.contains(p)),
        }
    }

    fn owners(&self) -> impl Iterator<Item = Owner> + '_ {
        let uids = self.cfg.proxy_uids.iter().map(|&u| Owner::Uid(u));
        uids.chain(self.cfg.proxy_gids.iter().map(|&g| Owner::Gid(g)))
    }

    fn outbound(&mut self) {
        use Chain::Owned as O;
        let (cfg, fam) = (self.cfg, self.family);
        for c in [Owned::Inbound, Owned::InRedirect, Owned::Output, Owned::Redirect] {
            self.chain(Table::Nat, c);
        }
        let tcp = || Match::Protocol(Protocol::Tcp);
        self.rule(Table::Nat, O(Owned::Redirect), vec![tcp()], Target::Redirect { port: cfg.outbound_port });
        if cfg.inbound_mode == InboundMode::Redirect || self.inbound_captured() {
            // Also used by the TPROXY mode for the proxy calling its own pod through `lo`.
            self.rule(Table::Nat, O(Owned::InRedirect), vec![tcp()], Target::Redirect { port: cfg.inbound_port });
        }
        self.rule(Table::Nat, Chain::Output, vec![tcp()], Target::Jump(Owned::Output));

        let out = O(Owned::Output);
        for iface in &cfg.exclude_interfaces {
            self.rule(Table::Nat, out, vec![Match::OutInterface(iface.clone())], Target::Return);
        }
        for ports in pack_ports(cfg.exclude_outbound_ports.iter().copied()) {
            self.rule(Table::Nat, out, vec![tcp(), Match::DestinationPorts(ports)], Target::Return);
        }
        let lo = || Match::OutInterface("lo".into());
        self.rule(Table::Nat, out, vec![lo(), Match::Source(fam.inbound_passthrough_source())], Target::Return);
        let self_call_ports: Option<Vec<PortRanges>> = match &cfg.include_inbound_ports {
            _ if !self.inbound_captured() => None,
            Selection::All => Some(vec![]),
            Selection::Only(ports) => {
                Some(pack_ports(ports.iter().copied().filter(|p| !cfg.exclude_inbound_ports.contains(p))))
            }
        };
        let owners: Vec<Owner> = self.owners().collect();
        for owner in owners {
            let not_loopback = Match::Destination { net: fam.loopback(), negate: true };
            let is_owner = Match::Owner { owner, negate: false };
            match &self_call_ports {
                None => {}
                Some(lists) if lists.is_empty() => self.rule(
                    Table::Nat,
                    out,
                    vec![lo(), not_loopback, is_owner.clone()],
                    Target::Jump(Owned::InRedirect),
                ),
                Some(lists) => {
                    for ports in lists {
                        let m = vec![
                            lo(),
                            not_loopback.clone(),
                            tcp(),
                            Match::DestinationPorts(ports.clone()),
                            is_owner.clone(),
                        ];
                        self.rule(Table::Nat, out, m, Target::Jump(Owned::InRedirect));
                    }
                }
            }
            self.rule(Table::Nat, out, vec![lo(), Match::Owner { owner, negate: true }], Target::Return);
            self.rule(Table::Nat, out, vec![is_owner], Target::Return);
        }
        self.rule(Table::Nat, out, vec![Match::Destination { net: fam.loopback(), negate: false }], Target::Return);
        for net in family_nets(fam, cfg.exclude_cidrs.iter()) {
            self.rule(Table::Nat, out, vec![Match::Destination { net, negate: false }], Target::Return);
        }
        for ports in pack_ports(cfg.include_outbound_ports.iter().copied()) {
            self.rule(Table::Nat, out, vec![tcp(), Match::DestinationPorts(ports)], Target::Jump(Owned::Redirect));
        }
        match &cfg.include_cidrs {
            Selection::All => self.rule(Table::Nat, out, vec![], Target::Jump(Owned::Redirect)),
            Selection::Only(nets) => {
                for net in family_nets(fam, nets.iter()) {
                    self.rule(
                        Table::Nat,
                        out,
                        vec![Match::Destination { net, negate: false }],
                        Target::Jump(Owned::Redirect),
                    );
                }
            }
        }
    }

    /// The ISTIO_INBOUND body shared by both inbound modes: interface and port exclusions, then
    /// `capture` for what is left.
    fn inbound_body(&mut self, table: Table, capture: impl Fn(Vec<Match>) -> Vec<(Vec<Match>, Target)>) {
        let cfg = self.cfg;
        let inb = Chain::Owned(Owned::Inbound);
        let tcp = || Match::Protocol(Protocol::Tcp);
        for iface in &cfg.exclude_interfaces {
            self.rule(table, inb, vec![Match::InInterface(iface.clone())], Target::Return);
        }
        match &cfg.include_inbound_ports {
            Selection::All => {
                for ports in pack_ports(cfg.exclude_inbound_ports.iter().copied()) {
                    self.rule(table, inb, vec![tcp(), Match::DestinationPorts(ports)], Target::Return);
                }
                for (m, t) in capture(vec![tcp()]) {
                    self.rule(table, inb, m, t);
                }
            }
            Selection::Only(ports) => {
                let wanted = ports.iter().copied().filter(|p| !cfg.exclude_inbound_ports.contains(p));
                for ports in pack_ports(wanted) {
                    for (m, t) in capture(vec![tcp(), Match::DestinationPorts(ports)]) {
                        self.rule(table, inb, m, t);
                    }
                }
            }
        }
    }

    fn inbound_redirect(&mut self) {
        if !self.inbound_captured() {
            return;
        }
        let tcp = Match::Protocol(Protocol::Tcp);
        self.rule(Table::Nat, Chain::Prerouting, vec![tcp], Target::Jump(Owned::Inbound));
        self.inbound_body(Table::Nat, |m| vec![(m, Target::Jump(Owned::InRedirect))]);
    }

    fn inbound_tproxy(&mut self) {
        if !self.inbound_captured() {
            return;
        }
        let (fam, port) = (self.family, self.cfg.inbound_port);
        for c in [Owned::Inbound, Owned::Divert, Owned::Tproxy] {
            self.chain(Table::Mangle, c);
        }
        let tcp = || Match::Protocol(Protocol::Tcp);
        self.rule(Table::Mangle, Chain::Prerouting, vec![tcp()], Target::Jump(Owned::Inbound));
        let divert = Chain::Owned(Owned::Divert);
        self.rule(Table::Mangle, divert, vec![], Target::Mark(TPROXY_MARK));
        self.rule(Table::Mangle, divert, vec![], Target::Accept);
        let not_loopback = Match::Destination { net: fam.loopback(), negate: true };
        self.rule(
            Table::Mangle,
            Chain::Owned(Owned::Tproxy),
            vec![not_loopback, tcp()],
            Target::Tproxy { port, mark: TPROXY_MARK },
        );
        // Loopback traffic never comes from outside the pod; the proxy's own hops use it.
        self.rule(Table::Mangle, Chain::Owned(Owned::Inbound), vec![Match::InInterface("lo".into())], Target::Return);
        self.inbound_body(Table::Mangle, |m| {
            let mut established = m.clone();
            established.push(Match::LocalSocket);
            vec![(established, Target::Jump(Owned::Divert)), (m, Target::Jump(Owned::Tproxy))]
        });
        self.plan.tproxy_route = Some(TPROXY_ROUTE);
    }

    fn dns(&mut self, dns_port: u16) {
        let owners: Vec<Owner> = self.owners().collect();
        let udp = || Match::Protocol(Protocol::Udp);
        let dport53 = || Match::DestinationPorts(vec![(53, 53)]);

        // nat: the application's DNS goes to the proxy's DNS port; the proxy's own goes out.
        self.chain(Table::Nat, Owned::OutputDns);
        let nat_dns = Chain::Owned(Owned::OutputDns);
        // Rendered before the ISTIO_OUTPUT jump, so that TCP/53 is not sent to the TCP proxy port.
        let jump = Rule { chain: Chain::Output, matches: vec![], target: Target::Jump(Owned::OutputDns) };
        self.table(Table::Nat).rules.insert(0, jump);
        for proto in [Protocol::Udp, Protocol::Tcp] {
            for &owner in &owners {
                let m = vec![Match::Protocol(proto), dport53(), Match::Owner { owner, negate: false }];
                self.rule(Table::Nat, nat_dns, m, Target::Return);
            }
            let mut m = vec![Match::Protocol(proto), dport53()];
            if proto == Protocol::Tcp {
                m.insert(0, Match::Destination { net: self.family.loopback(), negate: true });
            }
            self.rule(Table::Nat, nat_dns, m, Target::Redirect { port: dns_port });
        }

        // raw: conntrack zones so the proxy's upstream query and its answer to the application,
        // which share addresses and ports, are not merged into one conntrack entry.
        self.chain(Table::Raw, Owned::OutputDns);
        self.chain(Table::Raw, Owned::PreroutingDns);
        self.rule(Table::Raw, Chain::Output, vec![], Target::Jump(Owned::OutputDns));
        self.rule(Table::Raw, Chain::Prerouting, vec![], Target::Jump(Owned::PreroutingDns));
        let raw_dns = Chain::Owned(Owned::OutputDns);
        for &owner in &owners {
            let is_owner = Match::Owner { owner, negate: false };
            self.rule(
                Table::Raw,
                raw_dns,
                vec![udp(), dport53(), is_owner.clone()],
                Target::ConntrackZone(DNS_ZONE_UPSTREAM),
            );
            self.rule(
                Table::Raw,
                raw_dns,
                vec![udp(), Match::SourcePort(dns_port), is_owner],
                Target::ConntrackZone(DNS_ZONE_PROXY_REPLIES),
            );
        }
        self.rule(
            Table::Raw,
            Chain::Owned(Owned::PreroutingDns),
            vec![udp(), Match::SourcePort(53)],
            Target::ConntrackZone(DNS_ZONE_UPSTREAM),
        );
    }
}

/// The nets of one family, merged where they overlap or touch, in a stable order.
fn family_nets<'a>(family: Family, nets: impl Iterator<Item = &'a IpNet>) -> Vec<IpNet> {
    let mine: Vec<IpNet> = nets.filter(|n| family.matches(n)).copied().collect();
    IpNet::aggregate(&mine)
}

/// Packs sorted, de-duplicated ports into `multiport` lists: runs of consecutive ports become a
/// `first:last` range (worth two of multiport's 15 slots), lists are cut at 15 slots.
pub(super) fn pack_ports(ports: impl IntoIterator<Item = u16>) -> Vec<PortRanges> {
    let mut ranges: PortRanges = Vec::new();
    for p in ports {
        match ranges.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(p) => *last = p,
            Some((_, last)) if *last >= p => {} // duplicates; callers pass sorted sets
            _ => ranges.push((p, p)),
        }
    }
    let mut lists: Vec<PortRanges> = Vec::new();
    let mut used = MULTIPORT_MAX;
    for r in ranges {
        let cost = if r.0 == r.1 { 1 } else { 2 };
        if used + cost > MULTIPORT_MAX {
            lists.push(Vec::new());
            used = 0;
        }
        lists.last_mut().expect("pushed above").push(r);
        used += cost;
    }
    lists
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_pack_into_ranges_and_fifteen_slot_lists() {
        assert!(pack_ports([]).is_empty());
        assert_eq!(pack_ports([80]), vec![vec![(80, 80)]]);
        assert_eq!(pack_ports([80, 81, 82, 443]), vec![vec![(80, 82), (443, 443)]]);
        let odd: Vec<u16> = (0..40).map(|i| 1000 + 2 * i).collect();
        let lists = pack_ports(odd);
        assert_eq!(lists.iter().map(Vec::len).collect::<Vec<_>>(), vec![15, 15, 10]);
        // Seven ranges use 14 slots; the eighth does not fit.
        let ranges: Vec<u16> = (0..8).flat_map(|i| [2000 + 10 * i, 2001 + 10 * i]).collect();
        assert_eq!(pack_ports(ranges).iter().map(Vec::len).collect::<Vec<_>>(), vec![7, 1]);
        assert_eq!(pack_ports([65534, 65535]), vec![vec![(65534, 65535)]]);
    }
}

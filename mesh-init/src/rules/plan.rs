//! Deciding the rules: istio-iptables' capture semantics, as data.
//!
//! The rules are istio-iptables' own, in its order, so that every packet meets the same verdict
//! as under Istio (Istio's own test cases, simulated packet by packet, check that:
//! `tests/istio_conformance.rs`). The order of nat `ISTIO_OUTPUT` is the heart of it: excluded
//! interfaces and ports; the proxy's inbound passthrough (127.0.0.6); per proxy UID, then per
//! GID: the proxy calling its own pod through `lo` → inbound (not the tunnel port, nor DNS), the
//! application calling itself through `lo` → untouched, anything else of the proxy's → untouched;
//! the owner-group filter; DNS; loopback; excluded CIDRs; and finally what is captured.
//!
//! Where the rules differ from istio-iptables' text (never in a verdict):
//! - port lists are packed into `multiport` matches (consecutive ports become one `a:b` range),
//!   and CIDR lists are aggregated, so 1,000 ports stay a few dozen rules;
//! - the kernel's chains only ever hold jumps into chains we own, which is what makes cleanup
//!   exact: the `-c`/`-k` RETURNs istio-iptables puts in nat PREROUTING and OUTPUT sit at the top
//!   of `ISTIO_INBOUND` and `ISTIO_OUTPUT` (the only thing of ours those chains reach after
//!   them), and the TPROXY mode's mangle PREROUTING and OUTPUT rules live in `ISTIO_PREROUTING`
//!   and a mangle `ISTIO_OUTPUT`;
//! - chains that nothing would jump to are not created.

use ipnet::IpNet;

use super::{
    Chain, CtState, Family, Match, Owned, Owner, Plan, PortRanges, Protocol, Rule, Table, TablePlan, Target,
    TproxyRoute,
};
use crate::capture::{CaptureConfig, DnsServers, InboundMode, OwnerGroups, Selection, OUTBOUND_MARK};

/// iptables' `multiport` accepts at most 15 ports, a range counting as two.
const MULTIPORT_MAX: usize = 15;
/// Conntrack zones keeping the proxy's upstream DNS (1) apart from the application's DNS to the
/// proxy (2): both use the same addresses and ports, and one entry for both would not translate
/// the proxy's answer back.
const DNS_ZONE_UPSTREAM: u16 = 1;
const DNS_ZONE_APPLICATION: u16 = 2;
const DNS: u16 = 53;

/// Builds the plan for one family.
pub fn plan(cfg: &CaptureConfig, family: Family) -> Plan {
    let mut b = Builder { cfg, family, plan: Plan { family, tables: Default::default(), tproxy_route: None } };
    b.nat_chains();
    b.drop_invalid();
    b.inbound();
    b.outbound();
    if cfg.inbound_mode == InboundMode::Tproxy {
        b.tproxy_marks();
    }
    b.plan
}

struct Builder<'a> {
    cfg: &'a CaptureConfig,
    family: Family,
    plan: Plan,
}

fn tcp() -> Match {
    Match::Protocol(Protocol::Tcp)
}

fn udp() -> Match {
    Match::Protocol(Protocol::Udp)
}

fn lo_out() -> Match {
    Match::OutInterface("lo".into())
}

fn lo_in() -> Match {
    Match::InInterface("lo".into())
}

fn dport(port: u16) -> Match {
    Match::DestinationPorts { ports: vec![(port, port)], negate: false }
}

fn ports(ports: PortRanges) -> Match {
    Match::DestinationPorts { ports, negate: false }
}

fn dst(net: IpNet) -> Match {
    Match::Destination { net, negate: false }
}

fn owner(owner: Owner) -> Match {
    Match::Owner { owner, negate: false }
}

fn mark(mark: u32) -> Match {
    Match::Mark { mark, negate: false }
}

impl Builder<'_> {
    fn table(&mut self, t: Table) -> &mut TablePlan {
        self.plan.table_mut(t)
    }

    /// Appends a rule, creating the owned chain it is in (and the one it jumps to) if needed.
    fn rule(&mut self, t: Table, chain: Chain, matches: Vec<Match>, target: Target) {
        let tp = self.table(t);
        if let Chain::Owned(o) = chain {
            tp.chains.insert(o);
        }
        if let Target::Jump(o) = target {
            tp.chains.insert(o);
        }
        tp.rules.push(Rule { chain, matches, target });
    }

    /// The loopback range the application's own traffic uses in this family.
    fn loopback(&self) -> IpNet {
        match self.family {
            Family::V4 => IpNet::V4(self.cfg.ipv4_loopback),
            Family::V6 => "::1/128".parse().expect("literal"),
        }
    }

    fn not_loopback(&self) -> Match {
        Match::Destination { net: self.loopback(), negate: true }
    }

    fn nets<'a>(&self, nets: impl Iterator<Item = &'a IpNet>) -> Vec<IpNet> {
        let mine: Vec<IpNet> = nets.filter(|n| self.family.matches(n)).copied().collect();
        IpNet::aggregate(&mine)
    }

    /// The DNS servers of this family, `None` when DNS to this family is not captured.
    fn dns_servers(&self) -> Option<Option<Vec<IpNet>>> {
        let dns = self.cfg.dns.as_ref()?;
        match &dns.servers {
            DnsServers::All => Some(None),
            DnsServers::Only(all) => {
                let mine: Vec<IpNet> =
                    all.iter().map(|ip| IpNet::from(*ip)).filter(|n| self.family.matches(n)).collect();
                Some(Some(mine))
            }
        }
    }

    /// istio-iptables creates these four whatever the flags, and fills the redirect chains.
    fn nat_chains(&mut self) {
        use Chain::Owned as O;
        let cfg = self.cfg;
        for c in [Owned::Inbound, Owned::Redirect, Owned::InRedirect, Owned::Output] {
            self.table(Table::Nat).chains.insert(c);
        }
        self.rule(Table::Nat, O(Owned::Redirect), vec![tcp()], Target::Redirect { port: cfg.outbound_port });
        self.rule(Table::Nat, O(Owned::InRedirect), vec![tcp()], Target::Redirect { port: cfg.inbound_port });
    }

    /// mangle PREROUTING: INVALID packets are dropped instead of resetting a connection. In the
    /// TPROXY mode this rule goes into `ISTIO_PREROUTING` (after the excluded interfaces), see
    /// [`Self::tproxy_prerouting`].
    fn drop_invalid(&mut self) {
        if !self.cfg.drop_invalid {
            return;
        }
        self.rule(Table::Mangle, Chain::Owned(Owned::Drop), vec![], Target::Drop);
        if self.cfg.inbound_mode == InboundMode::Redirect {
            let invalid = Match::Conntrack(vec![CtState::Invalid]);
            self.rule(Table::Mangle, Chain::Prerouting, vec![invalid], Target::Jump(Owned::Drop));
        }
    }

    fn inbound(&mut self) {
        let cfg = self.cfg;
        let inb = Chain::Owned(Owned::Inbound);
        // KubeVirt interfaces: their traffic is the VM's outbound traffic, redirected to the
        // outbound port for the included CIDRs and otherwise left alone.
        for iface in cfg.kube_virt_interfaces.clone() {
            let from = Match::InInterface(iface);
            match &cfg.include_cidrs {
                Selection::All => {
                    self.rule(Table::Nat, Chain::Prerouting, vec![from.clone()], Target::Jump(Owned::Redirect))
                }
                Selection::Only(nets) => {
                    for net in self.nets(nets.iter()) {
                        let m = vec![from.clone(), dst(net)];
                        self.rule(Table::Nat, Chain::Prerouting, m, Target::Jump(Owned::Redirect));
                    }
                }
            }
            self.rule(Table::Nat, inb, vec![from], Target::Return);
        }
        for iface in &cfg.exclude_interfaces {
            self.rule(Table::Nat, inb, vec![Match::InInterface(iface.clone())], Target::Return);
        }
        self.rule(Table::Nat, inb, vec![tcp(), dport(cfg.tunnel_port)], Target::Return);
        if cfg.inbound_mode == InboundMode::Tproxy {
            self.tproxy_prerouting();
            return;
        }
        if !cfg.inbound_captured() {
            return;
        }
        self.rule(Table::Nat, Chain::Prerouting, vec![tcp()], Target::Jump(Owned::Inbound));
        self.inbound_ports(Table::Nat, |m| vec![(m, Target::Jump(Owned::InRedirect))]);
    }

    /// The port part of ISTIO_INBOUND shared by both inbound modes: exclusions (only with all
    /// ports, as istio-iptables does), then `capture` for what is left.
    fn inbound_ports(&mut self, table: Table, capture: impl Fn(Vec<Match>) -> Vec<(Vec<Match>, Target)>) {
        let cfg = self.cfg;
        let inb = Chain::Owned(Owned::Inbound);
        match &cfg.include_inbound_ports {
            Selection::All => {
                for p in pack_ports(cfg.exclude_inbound_ports.iter().copied()) {
                    self.rule(table, inb, vec![tcp(), ports(p)], Target::Return);
                }
                for (m, t) in capture(vec![tcp()]) {
                    self.rule(table, inb, m, t);
                }
            }
            Selection::Only(list) => {
                for p in pack_ports(list.iter().copied()) {
                    for (m, t) in capture(vec![tcp(), ports(p)]) {
                        self.rule(table, inb, m, t);
                    }
                }
            }
        }
    }

    /// TPROXY: istio-iptables' mangle PREROUTING rules (in `ISTIO_PREROUTING`), `ISTIO_INBOUND`,
    /// `ISTIO_DIVERT` and `ISTIO_TPROXY`, and the policy route.
    fn tproxy_prerouting(&mut self) {
        let cfg = self.cfg;
        let pre = Chain::Owned(Owned::Prerouting);
        let inb = Chain::Owned(Owned::Inbound);
        self.rule(Table::Mangle, Chain::Prerouting, vec![], Target::Jump(Owned::Prerouting));
        for iface in &cfg.exclude_interfaces {
            self.rule(Table::Mangle, pre, vec![Match::InInterface(iface.clone())], Target::Return);
        }
        if cfg.drop_invalid {
            self.rule(Table::Mangle, pre, vec![Match::Conntrack(vec![CtState::Invalid])], Target::Jump(Owned::Drop));
        }
        // Packets already marked, the proxy's hand-off from the passthrough source, and the
        // application's own traffic on `lo` (not marked as the proxy's) are not intercepted.
        self.table(Table::Mangle).chains.insert(Owned::Inbound);
        self.rule(Table::Mangle, inb, vec![tcp(), mark(cfg.tproxy_mark)], Target::Return);
        let passthrough = Match::Source(self.family.inbound_passthrough_source());
        self.rule(Table::Mangle, inb, vec![tcp(), passthrough, lo_in()], Target::Return);
        let not_proxy = Match::Mark { mark: OUTBOUND_MARK, negate: true };
        self.rule(Table::Mangle, inb, vec![tcp(), lo_in(), not_proxy], Target::Return);
        if cfg.inbound_captured() {
            let divert = Chain::Owned(Owned::Divert);
            self.rule(Table::Mangle, divert, vec![], Target::Mark(cfg.tproxy_mark));
            self.rule(Table::Mangle, divert, vec![], Target::Accept);
            let to = Target::Tproxy { port: cfg.inbound_port, mark: cfg.tproxy_mark };
            let not_loopback = self.not_loopback();
            self.rule(Table::Mangle, Chain::Owned(Owned::Tproxy), vec![not_loopback, tcp()], to);
            self.rule(Table::Mangle, pre, vec![tcp()], Target::Jump(Owned::Inbound));
            self.inbound_ports(Table::Mangle, |m| {
                let mut established = m.clone();
                established.push(Match::Conntrack(vec![CtState::Related, CtState::Established]));
                vec![(established, Target::Jump(Owned::Divert)), (m, Target::Jump(Owned::Tproxy))]
            });
            self.plan.tproxy_route = Some(TproxyRoute { mark: cfg.tproxy_mark, table: cfg.tproxy_table });
        }
        // The proxy's original-source connections carry the mark; the connection keeps it.
        self.rule(Table::Mangle, pre, vec![tcp(), mark(cfg.tproxy_mark)], Target::SaveMark);
    }

    /// TPROXY: mangle OUTPUT (in a mangle `ISTIO_OUTPUT`): the proxy's own hops to the pod are
    /// marked 1338 so that `ISTIO_INBOUND` tells them from the application's, and replies on a
    /// connection the proxy accepted get the TPROXY mark back, so they route through its table.
    fn tproxy_marks(&mut self) {
        let cfg = self.cfg;
        let out = Chain::Owned(Owned::Output);
        self.rule(Table::Mangle, Chain::Output, vec![], Target::Jump(Owned::Output));
        for iface in &cfg.exclude_interfaces {
            self.rule(Table::Mangle, out, vec![Match::OutInterface(iface.clone())], Target::Return);
        }
        self.rule(Table::Mangle, out, vec![tcp(), lo_out(), mark(cfg.tproxy_mark)], Target::Return);
        let owners: Vec<Owner> = self.owners().collect();
        for o in owners {
            let m = vec![self.not_loopback(), tcp(), lo_out(), owner(o)];
            self.rule(Table::Mangle, out, m, Target::Mark(OUTBOUND_MARK));
        }
        self.rule(Table::Mangle, out, vec![tcp(), Match::ConnMark(cfg.tproxy_mark)], Target::RestoreMark);
    }

    /// The proxy's UIDs, then its GIDs.
    fn owners(&self) -> impl Iterator<Item = Owner> + '_ {
        let uids = self.cfg.proxy_uids.iter().map(|&u| Owner::Uid(u));
        uids.chain(self.cfg.proxy_gids.iter().map(|&g| Owner::Gid(g)))
    }

    fn outbound(&mut self) {
        let cfg = self.cfg;
        let out = Chain::Owned(Owned::Output);
        let dns = self.dns_servers();
        self.rule(Table::Nat, Chain::Output, vec![], Target::Jump(Owned::Output));
        for iface in &cfg.exclude_interfaces {
            self.rule(Table::Nat, out, vec![Match::OutInterface(iface.clone())], Target::Return);
        }
        for p in pack_ports(cfg.exclude_outbound_ports.iter().copied()) {
            self.rule(Table::Nat, out, vec![tcp(), ports(p.clone())], Target::Return);
            self.rule(Table::Nat, out, vec![udp(), ports(p)], Target::Return);
        }
        let passthrough = Match::Source(self.family.inbound_passthrough_source());
        self.rule(Table::Nat, out, vec![lo_out(), passthrough], Target::Return);
        // istio-iptables only turns DNS on for the owner rules when some family captures DNS.
        let dns_on = cfg.dns.is_some();
        let owners: Vec<Owner> = self.owners().collect();
        for o in owners {
            // The proxy calling its own pod through `lo` goes to the inbound port, except the
            // tunnel port and, for UIDs with DNS capture, DNS (the agent answers it directly).
            let skip = match o {
                Owner::Uid(_) if dns_on => vec![(DNS, DNS), (cfg.tunnel_port, cfg.tunnel_port)],
                _ => vec![(cfg.tunnel_port, cfg.tunnel_port)],
            };
            let m = vec![
                lo_out(),
                self.not_loopback(),
                tcp(),
                Match::DestinationPorts { ports: sorted(skip), negate: true },
                owner(o),
            ];
            self.rule(Table::Nat, out, m, Target::Jump(Owned::InRedirect));
            // The application calling itself through `lo` is left alone, unless a loopback range
            // is captured on purpose; with DNS capture, TCP DNS to a local resolver is not.
            if !cfg.include_has_loopback {
                let not_owner = Match::Owner { owner: o, negate: true };
                let m = if dns_on {
                    vec![lo_out(), tcp(), Match::DestinationPorts { ports: vec![(DNS, DNS)], negate: true }, not_owner]
                } else {
                    vec![lo_out(), not_owner]
                };
                self.rule(Table::Nat, out, m, Target::Return);
            }
            self.rule(Table::Nat, out, vec![owner(o)], Target::Return);
        }
        match &cfg.owner_groups {
            OwnerGroups::AllExcept(gids) => {
                for &g in gids {
                    self.rule(Table::Nat, out, vec![owner(Owner::Gid(g))], Target::Return);
                }
            }
            OwnerGroups::Only(gids) => {
                let none_of = gids.iter().map(|&g| Match::Owner { owner: Owner::Gid(g), negate: true }).collect();
                self.rule(Table::Nat, out, none_of, Target::Return);
            }
        }
        if let Some(servers) = &dns {
            self.dns(servers.as_deref());
        }
        self.rule(Table::Nat, out, vec![dst(self.loopback())], Target::Return);
        for net in self.nets(cfg.exclude_cidrs.iter()) {
            self.rule(Table::Nat, out, vec![dst(net)], Target::Return);
        }
        for p in pack_ports(cfg.include_outbound_ports.iter().copied()) {
            self.rule(Table::Nat, out, vec![tcp(), ports(p)], Target::Jump(Owned::Redirect));
        }
        match &cfg.include_cidrs {
            Selection::All => self.rule(Table::Nat, out, vec![], Target::Jump(Owned::Redirect)),
            Selection::Only(nets) => {
                for net in self.nets(nets.iter()) {
                    self.rule(Table::Nat, out, vec![dst(net)], Target::Jump(Owned::Redirect));
                }
            }
        }
        if cfg.dns.is_some() {
            self.dns_zones(dns.as_ref().map(|s| s.as_deref()));
        }
    }

    /// nat: DNS to the servers (all: `None`) goes to the proxy's DNS port.
    fn dns(&mut self, servers: Option<&[IpNet]>) {
        let port = self.cfg.dns.as_ref().expect("called with DNS on").port;
        let nat_dns = Chain::Owned(Owned::OutputDns);
        if servers.is_some_and(|s| s.is_empty()) {
            return;
        }
        self.rule(Table::Nat, Chain::Owned(Owned::Output), vec![], Target::Jump(Owned::OutputDns));
        for proto in [Protocol::Tcp, Protocol::Udp] {
            match servers {
                None => {
                    self.rule(Table::Nat, nat_dns, vec![Match::Protocol(proto), dport(DNS)], Target::Redirect { port })
                }
                Some(list) => {
                    for &s in list {
                        let m = vec![Match::Protocol(proto), dport(DNS), dst(s)];
                        self.rule(Table::Nat, nat_dns, m, Target::Redirect { port });
                    }
                }
            }
        }
    }

    /// raw: conntrack zones. The proxy's queries upstream and their answers are zone 1, the
    /// application's queries (to the servers) and the proxy's answers zone 2, so that the
    /// answer meets the conntrack entry of the redirected query and is translated back — a
    /// resolver with a connected socket (glibc) drops it otherwise. `servers`: `None` for this
    /// family without captured servers, `Some(None)` for all.
    fn dns_zones(&mut self, servers: Option<Option<&[IpNet]>>) {
        let port = self.cfg.dns.as_ref().expect("called with DNS on").port;
        let raw_dns = Chain::Owned(Owned::OutputDns);
        let raw_in = Chain::Owned(Owned::Inbound);
        self.rule(Table::Raw, Chain::Output, vec![], Target::Jump(Owned::OutputDns));
        let owners: Vec<Owner> = self.owners().collect();
        for o in owners {
            let upstream = vec![udp(), dport(DNS), owner(o)];
            self.rule(Table::Raw, raw_dns, upstream, Target::ConntrackZone(DNS_ZONE_UPSTREAM));
            let answer = vec![udp(), Match::SourcePort(port), owner(o)];
            self.rule(Table::Raw, raw_dns, answer, Target::ConntrackZone(DNS_ZONE_APPLICATION));
        }
        match servers {
            Some(None) => {
                self.rule(Table::Raw, Chain::Prerouting, vec![], Target::Jump(Owned::Inbound));
                let query = vec![udp(), dport(DNS)];
                self.rule(Table::Raw, raw_dns, query, Target::ConntrackZone(DNS_ZONE_APPLICATION));
                let answer = vec![udp(), Match::SourcePort(DNS)];
                self.rule(Table::Raw, raw_in, answer, Target::ConntrackZone(DNS_ZONE_UPSTREAM));
            }
            Some(Some(list)) if !list.is_empty() => {
                self.rule(Table::Raw, Chain::Prerouting, vec![], Target::Jump(Owned::Inbound));
                for &s in list {
                    let query = vec![udp(), dport(DNS), dst(s)];
                    self.rule(Table::Raw, raw_dns, query, Target::ConntrackZone(DNS_ZONE_APPLICATION));
                    let answer = vec![udp(), Match::SourcePort(DNS), Match::Source(s)];
                    self.rule(Table::Raw, raw_in, answer, Target::ConntrackZone(DNS_ZONE_UPSTREAM));
                }
            }
            _ => {}
        }
    }
}

fn sorted(mut ranges: PortRanges) -> PortRanges {
    ranges.sort_unstable();
    ranges.dedup();
    ranges
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

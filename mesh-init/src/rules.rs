//! The iptables rules mesh-init wants, as plain data.
//!
//! [`plan`] decides (from a [`CaptureConfig`](crate::capture::CaptureConfig) and an IP family)
//! which chains and rules exist; [`render`] turns a [`Plan`] into `iptables-restore` text. Nothing
//! here runs a command: the plan is what golden tests snapshot and what `--dry-run` prints.
//! Applying it is [`crate::iptables`]'s job.

mod plan;
mod render;

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;
use serde::Serialize;

pub use plan::{plan, TPROXY_ROUTE};
pub use render::{render, render_rule, render_transaction};

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn matches(self, net: &IpNet) -> bool {
        matches!((self, net), (Family::V4, IpNet::V4(_)) | (Family::V6, IpNet::V6(_)))
    }
    /// The loopback host the proxy's own traffic is allowed to reach directly.
    pub fn loopback(self) -> IpNet {
        match self {
            Family::V4 => "127.0.0.1/32".parse().unwrap(),
            Family::V6 => "::1/128".parse().unwrap(),
        }
    }
    /// The source the proxy binds when it forwards inbound traffic to the local application, so
    /// that the OUTPUT rules can tell that hop apart and leave it alone (Istio's convention).
    pub fn inbound_passthrough_source(self) -> IpNet {
        match self {
            Family::V4 => "127.0.0.6/32".parse().unwrap(),
            Family::V6 => "::6/128".parse().unwrap(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The tables mesh-init writes to, in the order they are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Table {
    Raw,
    Mangle,
    Nat,
}

impl Table {
    pub const ALL: [Table; 3] = [Table::Raw, Table::Mangle, Table::Nat];
    pub fn name(self) -> &'static str {
        match self {
            Table::Raw => "raw",
            Table::Mangle => "mangle",
            Table::Nat => "nat",
        }
    }
}

/// A chain: one of the kernel's, or one mesh-init owns (and may flush and delete at will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Chain {
    Prerouting,
    Output,
    Owned(Owned),
}

/// The chains mesh-init owns. Names follow Istio so that existing tooling and runbooks apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Owned {
    /// nat/mangle: inbound TCP, from PREROUTING.
    Inbound,
    /// nat: REDIRECT to the inbound port.
    InRedirect,
    /// nat: outbound TCP, from OUTPUT.
    Output,
    /// nat: REDIRECT to the outbound port.
    Redirect,
    /// mangle: marks packets of connections the transparent proxy already owns.
    Divert,
    /// mangle: TPROXY to the inbound port.
    Tproxy,
    /// nat and raw: DNS capture, from OUTPUT.
    OutputDns,
    /// raw: DNS replies' conntrack zone, from PREROUTING.
    PreroutingDns,
}

impl Owned {
    pub const ALL: [Owned; 8] = [
        Owned::Inbound,
        Owned::InRedirect,
        Owned::Output,
        Owned::Redirect,
        Owned::Divert,
        Owned::Tproxy,
        Owned::OutputDns,
        Owned::PreroutingDns,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Owned::Inbound => "ISTIO_INBOUND",
            Owned::InRedirect => "ISTIO_IN_REDIRECT",
            Owned::Output => "ISTIO_OUTPUT",
            Owned::Redirect => "ISTIO_REDIRECT",
            Owned::Divert => "ISTIO_DIVERT",
            Owned::Tproxy => "ISTIO_TPROXY",
            Owned::OutputDns => "ISTIO_OUTPUT_DNS",
            Owned::PreroutingDns => "ISTIO_PRERT",
        }
    }
    pub fn from_name(name: &str) -> Option<Owned> {
        Owned::ALL.into_iter().find(|o| o.name() == name)
    }
}

impl Chain {
    pub fn name(self) -> &'static str {
        match self {
            Chain::Prerouting => "PREROUTING",
            Chain::Output => "OUTPUT",
            Chain::Owned(o) => o.name(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Who created a locally generated packet (the `owner` match).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Owner {
    Uid(u32),
    Gid(u32),
}

/// One condition of a rule. Rendered in the order given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Match {
    Protocol(Protocol),
    InInterface(String),
    OutInterface(String),
    Source(IpNet),
    Destination {
        net: IpNet,
        negate: bool,
    },
    /// Destination ports as inclusive ranges; more than one range is rendered as a `multiport`
    /// match (at most 15 slots, a range taking two, which [`plan`] guarantees).
    DestinationPorts(Vec<(u16, u16)>),
    SourcePort(u16),
    Owner {
        owner: Owner,
        negate: bool,
    },
    /// The packet belongs to a socket on this host (`-m socket`): TPROXY'd connections already
    /// accepted by the proxy.
    LocalSocket,
}

/// What a matching packet does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Target {
    Jump(Owned),
    Return,
    Accept,
    Redirect { port: u16 },
    Tproxy { port: u16, mark: u32 },
    Mark(u32),
    ConntrackZone(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub chain: Chain,
    pub matches: Vec<Match>,
    pub target: Target,
}

/// Everything mesh-init wants in one table: the owned chains to (re)create and the rules, in
/// order. Jumps from the kernel's chains are rules too (their `chain` is not `Owned`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TablePlan {
    pub chains: BTreeSet<Owned>,
    pub rules: Vec<Rule>,
}

/// The whole plan for one IP family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub family: Family,
    /// Indexed like [`Table::ALL`].
    pub tables: [TablePlan; 3],
    /// Policy routing the TPROXY mode needs (`ip rule` + a local route); outside iptables.
    pub tproxy_route: Option<TproxyRoute>,
}

impl Plan {
    pub fn table(&self, t: Table) -> &TablePlan {
        &self.tables[t as usize]
    }
    pub fn table_mut(&mut self, t: Table) -> &mut TablePlan {
        &mut self.tables[t as usize]
    }
    pub fn rule_count(&self) -> usize {
        self.tables.iter().map(|t| t.rules.len()).sum()
    }
}

/// Packets marked `mark` are routed to the local host through table `table`, which is how a
/// TPROXY'd packet reaches the transparent listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TproxyRoute {
    pub mark: u32,
    pub table: u32,
}

//! The iptables rules mesh-init wants, as plain data.
//!
//! [`plan`] decides (from a [`CaptureConfig`](crate::capture::CaptureConfig) and an IP family)
//! which chains and rules exist; [`render`] turns a [`Plan`] into `iptables-restore` text and
//! [`render_nft`] into an `nft -f` script (`--native-nftables`). Nothing
//! here runs a command: the plan is what golden tests snapshot and what `--dry-run` prints.
//! Applying it is [`crate::iptables`]'s job.

mod nft;
mod plan;
mod render;
mod saved;

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

pub use nft::{family_name as nft_family, parse_nft_json, render_nft, render_nft_removal, render_nft_rule};
pub use plan::plan;
pub use render::{render, render_rule, render_transaction};
pub use saved::parse_saved;

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
    pub fn of(ip: std::net::IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    /// The source the proxy binds when it forwards inbound traffic to the local application, so
    /// that the OUTPUT rules can tell that hop apart and leave it alone (Istio's convention).
    pub fn inbound_passthrough_source(self) -> IpNet {
        match self {
            Family::V4 => IpNet::from(IpAddr::V4(mesh_common::INBOUND_PASSTHROUGH_V4)),
            Family::V6 => IpNet::from(IpAddr::V6(mesh_common::INBOUND_PASSTHROUGH_V6)),
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
    /// nat and mangle: inbound TCP, from PREROUTING; raw: DNS replies' conntrack zone.
    Inbound,
    /// nat: REDIRECT to the inbound port.
    InRedirect,
    /// nat: outbound traffic, from OUTPUT; mangle (TPROXY): the marks of the proxy's own hops.
    Output,
    /// nat: REDIRECT to the outbound port.
    Redirect,
    /// mangle: marks packets of connections the transparent proxy already owns.
    Divert,
    /// mangle: TPROXY to the inbound port.
    Tproxy,
    /// nat and raw: DNS capture and its conntrack zones, from OUTPUT.
    OutputDns,
    /// mangle: drops what conntrack finds INVALID (`--drop-invalid`).
    Drop,
    /// mangle (TPROXY): istio-iptables' PREROUTING rules, gathered in a chain of ours so that the
    /// kernel's chain only holds a jump.
    Prerouting,
}

impl Owned {
    pub const ALL: [Owned; 9] = [
        Owned::Inbound,
        Owned::InRedirect,
        Owned::Output,
        Owned::Redirect,
        Owned::Divert,
        Owned::Tproxy,
        Owned::OutputDns,
        Owned::Drop,
        Owned::Prerouting,
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
            Owned::Drop => "ISTIO_DROP",
            Owned::Prerouting => "ISTIO_PREROUTING",
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
    pub fn from_name(name: &str) -> Option<Chain> {
        match name {
            "PREROUTING" => Some(Chain::Prerouting),
            "OUTPUT" => Some(Chain::Output),
            _ => Owned::from_name(name).map(Chain::Owned),
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

/// Conntrack states (the `conntrack --ctstate` match).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum CtState {
    New,
    Established,
    Related,
    Invalid,
}

impl CtState {
    pub fn name(self) -> &'static str {
        match self {
            CtState::New => "NEW",
            CtState::Established => "ESTABLISHED",
            CtState::Related => "RELATED",
            CtState::Invalid => "INVALID",
        }
    }
}

/// Destination ports as inclusive ranges; more than one range is a `multiport` match (at most
/// 15 slots, a range taking two, which [`plan`] guarantees).
pub type PortRanges = Vec<(u16, u16)>;

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
    DestinationPorts {
        ports: PortRanges,
        negate: bool,
    },
    SourcePort(u16),
    Owner {
        owner: Owner,
        negate: bool,
    },
    /// The connection's conntrack state is one of these.
    Conntrack(Vec<CtState>),
    /// The packet's firewall mark (all 32 bits).
    Mark {
        mark: u32,
        negate: bool,
    },
    /// The connection's mark.
    ConnMark(u32),
}

/// What a matching packet does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Target {
    Jump(Owned),
    Return,
    Accept,
    Drop,
    Redirect {
        port: u16,
    },
    Tproxy {
        port: u16,
        mark: u32,
    },
    /// Sets the packet's mark and goes on.
    Mark(u32),
    /// Copies the packet's mark to its connection (`CONNMARK --save-mark`) and goes on.
    SaveMark,
    /// Copies the connection's mark to the packet (`CONNMARK --restore-mark`) and goes on.
    RestoreMark,
    /// Puts a packet not yet tracked in a conntrack zone and goes on; the first zone given wins.
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

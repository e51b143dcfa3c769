//! The packet `mesh-init trace` follows, from flags such as `--dst 10.96.0.20:9080 --uid 1000`.

use std::net::{IpAddr, SocketAddr};

use crate::{
    capture::Host,
    rules::{CtState, Family, Protocol},
};

/// Where the packet meets netfilter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Sent by a process of the pod: raw, mangle and nat OUTPUT.
    Outbound,
    /// Arriving at the pod: raw, mangle and nat PREROUTING.
    Inbound,
}

/// The packet's flags, as given.
#[derive(Debug, Clone, clap::Args)]
pub struct PacketArgs {
    /// Destination address and port: `10.96.0.20:9080`, `[fd00::1]:80`.
    #[arg(long = "dst", value_name = "ADDR:PORT")]
    pub dst: String,
    /// Source address, and port: `10.200.0.2:40000` (unset: matches no `-s` rule).
    #[arg(long = "src", value_name = "ADDR[:PORT]")]
    pub src: Option<String>,
    #[arg(long = "proto", value_enum, default_value = "tcp")]
    pub proto: ProtoArg,
    /// An inbound packet (PREROUTING) rather than one the pod sends (OUTPUT).
    #[arg(long = "inbound")]
    pub inbound: bool,
    /// The sending process's UID (number or user name), for outbound packets.
    #[arg(long = "uid", default_value = "0")]
    pub uid: String,
    /// The sending process's GID (number or group name), for outbound packets.
    #[arg(long = "gid", default_value = "0")]
    pub gid: String,
    /// The interface an inbound packet arrives on (implies --inbound) [default: eth0].
    #[arg(long = "in-iface")]
    pub in_iface: Option<String>,
    /// The interface an outbound packet leaves by [default: lo for a loopback destination, else
    /// eth0]; a pod calling its own address leaves by lo.
    #[arg(long = "out-iface")]
    pub out_iface: Option<String>,
    /// The packet's firewall mark.
    #[arg(long = "mark", default_value = "0")]
    pub mark: String,
    /// The mark of its connection.
    #[arg(long = "connmark", default_value = "0")]
    pub connmark: String,
    /// The conntrack state of its connection; nat is only consulted for a new one.
    #[arg(long = "state", value_enum, default_value = "new")]
    pub state: StateArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtoArg {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    New,
    Established,
    Related,
    Invalid,
}

/// A packet, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub direction: Direction,
    pub proto: Protocol,
    pub src: Option<IpAddr>,
    pub src_port: Option<u16>,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub uid: u32,
    pub gid: u32,
    pub in_iface: String,
    pub out_iface: String,
    pub mark: u32,
    pub connmark: u32,
    pub state: CtState,
}

/// A packet flag that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value {value:?} for {flag}: {reason}")]
pub struct InvalidPacket {
    pub flag: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl PacketArgs {
    pub fn resolve(&self, host: &dyn Host) -> Result<Packet, InvalidPacket> {
        let bad = |flag: &'static str, value: &str, reason: &'static str| InvalidPacket {
            flag,
            value: value.to_string(),
            reason,
        };
        let dst: SocketAddr =
            self.dst.parse().map_err(|_| bad("--dst", &self.dst, "expected ADDR:PORT such as 10.96.0.20:9080"))?;
        let (src, src_port) = match &self.src {
            None => (None, None),
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => (Some(a.ip()), Some(a.port())),
                Err(_) => {
                    let ip = s.parse::<IpAddr>().map_err(|_| bad("--src", s, "expected ADDR or ADDR:PORT"))?;
                    (Some(ip), None)
                }
            },
        };
        if src.is_some_and(|s| Family::of(s) != Family::of(dst.ip())) {
            return Err(bad("--src", self.src.as_deref().unwrap_or(""), "source and destination must be one family"));
        }
        let id = |flag: &'static str, v: &str, lookup: &dyn Fn(&str) -> Option<u32>| {
            v.parse::<u32>().ok().or_else(|| lookup(v)).ok_or_else(|| bad(flag, v, "expected a number or a known name"))
        };
        let uid = id("--uid", &self.uid, &|n| host.user_id(n))?;
        let gid = id("--gid", &self.gid, &|n| host.group_id(n))?;
        let number = |flag: &'static str, v: &str| {
            let t = v.trim();
            match t.strip_prefix("0x") {
                Some(hex) => u32::from_str_radix(hex, 16),
                None => t.parse(),
            }
            .map_err(|_| bad(flag, v, "expected a number (decimal or 0x hexadecimal)"))
        };
        let inbound = self.inbound || self.in_iface.is_some();
        let out_iface =
            self.out_iface.clone().unwrap_or_else(|| if dst.ip().is_loopback() { "lo".into() } else { "eth0".into() });
        Ok(Packet {
            direction: if inbound { Direction::Inbound } else { Direction::Outbound },
            proto: match self.proto {
                ProtoArg::Tcp => Protocol::Tcp,
                ProtoArg::Udp => Protocol::Udp,
            },
            src,
            src_port,
            dst: dst.ip(),
            dst_port: dst.port(),
            uid,
            gid,
            in_iface: self.in_iface.clone().unwrap_or_else(|| "eth0".into()),
            out_iface,
            mark: number("--mark", &self.mark)?,
            connmark: number("--connmark", &self.connmark)?,
            state: match self.state {
                StateArg::New => CtState::New,
                StateArg::Established => CtState::Established,
                StateArg::Related => CtState::Related,
                StateArg::Invalid => CtState::Invalid,
            },
        })
    }
}

impl Packet {
    pub fn family(&self) -> Family {
        Family::of(self.dst)
    }

    /// Parses one packet from its flags as a single line (`--dst 10.0.0.1:80 --uid 1000`), as
    /// `mesh-init trace --packets FILE` reads them.
    pub fn from_line(line: &str, host: &dyn Host) -> Result<Packet, String> {
        #[derive(clap::Parser)]
        #[command(name = "packet", no_binary_name = true)]
        struct One {
            #[command(flatten)]
            packet: PacketArgs,
        }
        let one = <One as clap::Parser>::try_parse_from(line.split_whitespace()).map_err(|e| e.to_string())?;
        one.packet.resolve(host).map_err(|e| e.to_string())
    }
}

impl std::fmt::Display for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        };
        let dst = SocketAddr::new(self.dst, self.dst_port);
        let src = match (self.src, self.src_port) {
            (Some(ip), Some(p)) => SocketAddr::new(ip, p).to_string(),
            (Some(ip), None) => ip.to_string(),
            (None, _) => "any".into(),
        };
        match self.direction {
            Direction::Outbound => write!(
                f,
                "{} {proto} sent by uid {} gid {} from {src} to {dst} out {}",
                self.family(),
                self.uid,
                self.gid,
                self.out_iface
            )?,
            Direction::Inbound => {
                write!(f, "{} {proto} arriving on {} from {src} to {dst}", self.family(), self.in_iface)?
            }
        }
        write!(f, ", state {}", self.state.name().to_lowercase())?;
        if self.mark != 0 {
            write!(f, ", mark {}", self.mark)?;
        }
        if self.connmark != 0 {
            write!(f, ", connmark {}", self.connmark)?;
        }
        Ok(())
    }
}

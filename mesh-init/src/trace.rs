//! `mesh-init trace`: which rules a packet meets, in which chain, and what becomes of it —
//! the answer to "why is this connection (not) intercepted", in one command.
//!
//! - [`packet`]: the packet, from flags (`--dst 10.96.0.20:9080 --uid 1000 ...`);
//! - [`eval`]: following it through a [`Plan`] as netfilter would;
//! - [`live`]: the rules installed in a namespace, read back as plans (`--live`).
//!
//! The plan is the one `mesh-init iptables` would install for the same capture flags (no root
//! needed), or with `--live` the rules installed in a namespace, read back.

pub mod eval;
pub mod live;
pub mod packet;

use std::{fmt::Write as _, io::BufRead, path::PathBuf};

pub use eval::{evaluate, Trace, Verdict};
pub use packet::{Packet, PacketArgs};

use crate::{
    capture::{CaptureConfig, Host},
    rules::{self, Family, Plan},
};

/// Flags of `mesh-init trace` besides the capture flags and `--netns`.
#[derive(Debug, Clone, clap::Args)]
pub struct TraceArgs {
    #[command(flatten)]
    pub packet: Option<PacketArgs>,
    /// Many packets, one a line: `NAME FLAGS...` (`app-svc --dst 10.96.0.20:9080 --uid 1000`);
    /// prints `NAME VERDICT` for each. `-` reads standard input.
    #[arg(long = "packets", conflicts_with = "dst")]
    pub packets: Option<PathBuf>,
    /// Follow the rules installed in the namespace (--netns), read back with iptables-save or
    /// nft, instead of those the capture flags mean (which are then ignored).
    #[arg(long = "live")]
    pub live: bool,
    /// With --live: which iptables to read (native nftables tables of ours are read first).
    #[arg(long = "iptables-backend", value_parser = crate::iptables::BackendChoice::parse, default_value = "auto")]
    pub backend: crate::iptables::BackendChoice,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("give a packet (--dst ADDR:PORT and its other flags) or --packets FILE")]
    NoPacket,
    #[error(transparent)]
    Packet(#[from] packet::InvalidPacket),
    #[error("{file}:{line}: {reason}")]
    PacketLine { file: String, line: usize, reason: String },
    #[error("reading {file}: {cause}")]
    Read { file: String, cause: std::io::Error },
    #[error("--live: {0}")]
    Live(#[from] crate::iptables::Error),
}

/// Traces the packet(s) of `args` through the plan for `capture` (with `--live`: through the
/// rules installed in the current namespace), and writes the answer to `out`.
pub fn run(args: &TraceArgs, capture: &CaptureConfig, host: &dyn Host, out: &mut String) -> Result<(), Error> {
    let plans = if args.live {
        let live = live::read(args.backend)?;
        if args.packets.is_none() {
            writeln!(out, "rules: installed, read from {}", live.source).unwrap();
        }
        for rule in &live.unknown {
            writeln!(out, "warning: not followed (not mesh-init's vocabulary): {rule}").unwrap();
        }
        live.plans
    } else {
        [rules::plan(capture, Family::V4), rules::plan(capture, Family::V6)]
    };
    let plan_for = |p: &Packet| &plans[usize::from(p.family() == Family::V6)];
    if let Some(file) = &args.packets {
        let name = file.display().to_string();
        let read = |cause| Error::Read { file: name.clone(), cause };
        let reader: Box<dyn BufRead> = if name == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(std::fs::File::open(file).map_err(read)?))
        };
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(read)?;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, flags) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let pkt = Packet::from_line(flags, host).map_err(|reason| Error::PacketLine {
                file: name.clone(),
                line: n + 1,
                reason,
            })?;
            writeln!(out, "{id} {}", evaluate(plan_for(&pkt), &pkt).verdict).unwrap();
        }
        return Ok(());
    }
    let pkt = args.packet.as_ref().ok_or(Error::NoPacket)?.resolve(host)?;
    let plan = plan_for(&pkt);
    describe(plan, &pkt, &evaluate(plan, &pkt), out);
    Ok(())
}

/// The human answer: the packet, each table with the rules it matched, and the verdict.
pub fn describe(plan: &Plan, pkt: &Packet, trace: &Trace, out: &mut String) {
    writeln!(out, "packet: {pkt}").unwrap();
    for (table, steps) in &trace.tables {
        if steps.is_empty() {
            let mine = !plan.table(*table).rules.is_empty();
            let why = if mine { "no rule matched" } else { "no rules of mesh-init" };
            writeln!(out, "{} {}: {why}", table.name(), hook(pkt)).unwrap();
            continue;
        }
        writeln!(out, "{} {}:", table.name(), hook(pkt)).unwrap();
        for step in steps {
            let at = format!("{} #{}", step.rule.chain.name(), step.position);
            writeln!(out, "  {at:<22} -A {}", rules::render_rule(&step.rule)).unwrap();
        }
    }
    if trace.nat_skipped && !trace.verdict.dropped {
        writeln!(out, "nat {}: not consulted: the connection exists, conntrack applies its NAT", hook(pkt)).unwrap();
    }
    writeln!(out, "verdict: {}", trace.verdict).unwrap();
    writeln!(out, "  {}", explain(pkt, &trace.verdict)).unwrap();
}

fn hook(pkt: &Packet) -> &'static str {
    match pkt.direction {
        packet::Direction::Outbound => "OUTPUT",
        packet::Direction::Inbound => "PREROUTING",
    }
}

/// One sentence on what the verdict means for the connection.
fn explain(pkt: &Packet, v: &Verdict) -> String {
    let dst = std::net::SocketAddr::new(pkt.dst, pkt.dst_port);
    if v.dropped {
        return "dropped".into();
    }
    if let Some(port) = v.redirect {
        return format!("redirected to local port {port}; the listener reads {dst} as SO_ORIGINAL_DST");
    }
    if let Some(port) = v.tproxy {
        return format!(
            "handed to the transparent listener on port {port} with {dst} kept as its local address; the mark \
             routes it through the TPROXY table"
        );
    }
    if v.mark.is_some() || v.zone.is_some() || v.connmark.is_some() {
        return format!("not intercepted; goes on to {dst} with the marks above");
    }
    format!("not intercepted: goes on to {dst} unchanged")
}

//! Free ports on the machine's own loopback, for servers a test starts outside any namespace
//! (mesh-proxy's own tests). Inside a namespace of its own a test owns every port and uses fixed
//! ones.
//!
//! The usual trick, `bind(127.0.0.1:0)`, read the port, close, hand it out, has two races: the
//! kernel may give the same port to the next `bind(:0)` (two of our servers collided that way),
//! and any outgoing connection on the machine may take it as its source port before the server
//! binds it. So ports come from outside the kernel's ephemeral range
//! (`net.ipv4.ip_local_port_range`), which neither `bind(:0)` nor `connect` ever picks, in blocks
//! of [`BLOCK`] that a process claims for its lifetime by binding an abstract unix socket named
//! after the block (the kernel releases it when the process dies, however it dies; nothing is
//! left on disk). Within the block a port is handed out once, after a bind that proves nobody
//! else (a program with a fixed port) holds it. What remains: a program outside mesh-lab may
//! bind a fixed port of the block between the probe and the use.

use std::{
    net::{Ipv4Addr, TcpListener},
    os::{linux::net::SocketAddrExt, unix::net::UnixListener},
    sync::Mutex,
};

/// Ports a process claims at a time; a test binary uses a few dozen.
pub const BLOCK: u16 = 128;

/// The lowest port handed out: above the well-known ports and the mesh's own (15000-15100).
const FIRST: u16 = 16384;

/// The block being handed out, and every claim this process holds (kept until exit: ports of
/// an exhausted block may still be in use).
struct Blocks {
    claims: Vec<UnixListener>,
    /// The next port to try and the end of the block (u32: the last block ends at 65536).
    next: u32,
    end: u32,
}

static BLOCKS: Mutex<Blocks> = Mutex::new(Blocks { claims: Vec::new(), next: 0, end: 0 });

/// A loopback TCP port that nothing listens on now, never handed out before by this process or
/// by another process using mesh-lab, and never picked by the kernel for `bind(:0)` or an
/// outgoing connection. Call it from the machine's namespace (the claim is per namespace).
pub fn free_port() -> u16 {
    let mut b = BLOCKS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    loop {
        if b.next == b.end {
            let (claim, start) = claim_block(b.claims.len());
            b.claims.push(claim);
            (b.next, b.end) = (u32::from(start), u32::from(start) + u32::from(BLOCK));
        }
        let port = b.next as u16;
        b.next += 1;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            return port;
        }
    }
}

/// Claims the next free block: starting from one derived from the PID (so that concurrent test
/// processes rarely try the same ones), the first whose abstract socket can be bound. `held`
/// blocks are ours already.
fn claim_block(held: usize) -> (UnixListener, u16) {
    let (lo, hi) = ephemeral_range();
    let outside: Vec<u16> = (FIRST..=u16::MAX - (BLOCK - 1))
        .step_by(BLOCK as usize)
        .filter(|&start| start + (BLOCK - 1) < lo || start > hi)
        .collect();
    // A machine whose ephemeral range covers everything: blocks still keep processes apart, only
    // the race with `bind(:0)` comes back.
    let blocks =
        if outside.is_empty() { (FIRST..=u16::MAX - (BLOCK - 1)).step_by(BLOCK as usize).collect() } else { outside };
    let first = (std::process::id() as usize + held) % blocks.len();
    for start in blocks.iter().cycle().skip(first).take(blocks.len()) {
        let name = format!("mesh-lab-ports-{start}");
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name");
        if let Ok(claim) = UnixListener::bind_addr(&addr) {
            return (claim, *start);
        }
    }
    panic!("free_port: every block of {BLOCK} ports from {FIRST} is claimed by other processes");
}

/// `net.ipv4.ip_local_port_range` (Linux's default when it cannot be read).
fn ephemeral_range() -> (u16, u16) {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut it = text.split_whitespace().filter_map(|p| p.parse().ok());
    match (it.next(), it.next()) {
        (Some(lo), Some(hi)) => (lo, hi),
        _ => (32768, 60999),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_never_handed_out_twice_and_never_ephemeral() {
        let (lo, hi) = ephemeral_range();
        let mut seen = std::collections::BTreeSet::new();
        // More than one block, so claiming the next one is exercised too.
        for _ in 0..(BLOCK as usize * 2 + 10) {
            let port = free_port();
            assert!(seen.insert(port), "{port} handed out twice");
            assert!(port >= FIRST && !(lo..=hi).contains(&port), "{port} is in the ephemeral range {lo}-{hi}");
        }
    }

    #[test]
    fn a_port_someone_listens_on_is_skipped() {
        // saturating: the last port of the top block is 65535.
        let taken = free_port().saturating_add(1);
        let _busy = TcpListener::bind((Ipv4Addr::LOCALHOST, taken));
        // Whichever ports come next, the one held above is not among them.
        for _ in 0..4 {
            assert_ne!(free_port(), taken);
        }
    }
}

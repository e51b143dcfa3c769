//! The proxy's inbound passthrough source on IPv6.
//!
//! The proxy hands an inbound connection to the local application from 127.0.0.6 (IPv4) or ::6
//! (IPv6), which the capture rules (and the eBPF inbound program) leave alone so the hand-off is
//! not captured again. All of 127.0.0.0/8 is on `lo` already, but ::6 is not: without it the
//! proxy cannot bind that source, and an application listening only on the pod's IPv6 address
//! is unreachable inbound. Istio's init container adds it for the same reason.

use mesh_common::INBOUND_PASSTHROUGH_V6;

use crate::iptables::{self, Error};

/// `::6/128`, as `ip` takes it and shows it.
fn addr() -> String {
    format!("{INBOUND_PASSTHROUGH_V6}/128")
}

/// Puts ::6 on `lo` (a no-op when it is there). Only called when IPv6 is being captured.
pub fn add_passthrough_v6() -> Result<(), Error> {
    iptables::command("ip", &["-6", "addr", "replace", &addr(), "dev", "lo"]).map(drop)
}

/// Removes ::6 from `lo` if it is there (cleanup).
pub fn remove_passthrough_v6() -> Result<(), Error> {
    let shown = iptables::command("ip", &["-6", "addr", "show", "dev", "lo"])?;
    let shown_as = format!("inet6 {}", addr());
    if shown.lines().any(|l| l.trim_start().starts_with(&shown_as)) {
        iptables::command("ip", &["-6", "addr", "del", &addr(), "dev", "lo"])?;
    }
    Ok(())
}

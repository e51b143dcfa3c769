//! Loops back into the proxy. An endpoint that is one of the proxy's own listeners sends each
//! request back in, where the same route sends it out to the same endpoint again: one request
//! took a proxy from 24 to ~19,800 descriptors in 3 s (issue 12). Validation refuses such an
//! endpoint; a loop it cannot see (through another hop) is cut by the `Via` header the proxy
//! adds to each request it forwards ([`crate::data::http`]).
//!
//! This check needs what plain validation does not have: the addresses the listeners are bound to
//! (a port 0 becomes the kernel's choice) and the namespace's own addresses (a listener on
//! `0.0.0.0` is also the pod's IP and loopback), so it runs once the listeners are prepared.

use std::net::{IpAddr, SocketAddr};

use super::{invalid, Cluster, Error};

/// Whether `addr` reaches one of `own` (bound addresses): the same port, and the same IP or a
/// listener on the unspecified address with `addr`'s IP local (`is_local`).
pub fn is_own(own: &[SocketAddr], addr: SocketAddr, is_local: impl Fn(IpAddr) -> bool) -> Option<SocketAddr> {
    own.iter().copied().find(|l| {
        l.port() == addr.port()
            && (l.ip() == addr.ip()
                || (l.ip().is_unspecified() && l.is_ipv4() == addr.is_ipv4() && is_local(addr.ip())))
    })
}

/// Refuses an endpoint of `clusters` that is one of the proxy's `own` addresses.
pub fn check(clusters: &[Cluster], own: &[SocketAddr], is_local: impl Fn(IpAddr) -> bool) -> Result<(), Error> {
    for c in clusters {
        for &ep in &c.endpoints {
            if let Some(listener) = is_own(own, ep, &is_local) {
                return Err(invalid(
                    format!("endpoints (cluster {:?})", c.name),
                    format_args!(
                        "{ep} is the proxy's own address {listener}: every request sent there would come back \
                         into the proxy and loop"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CircuitBreakers, LbPolicy, UpstreamProtocol, DEFAULT_CONNECT_TIMEOUT};

    fn cluster(eps: &[&str]) -> Cluster {
        Cluster {
            name: "c".into(),
            lb_policy: LbPolicy::RoundRobin,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            protocol: UpstreamProtocol::Http1,
            consistent_hash: None,
            tcp_keepalive: None,
            circuit_breakers: CircuitBreakers::default(),
            max_requests_per_connection: None,
            idle_timeout: None,
            outlier_detection: None,
            endpoints: eps.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn own_listeners_are_refused_as_endpoints() {
        let own: Vec<SocketAddr> =
            ["0.0.0.0:15001", "[::]:15001", "127.0.0.1:15090"].map(|a| a.parse().unwrap()).into();
        let local = |ip: IpAddr| ip.is_loopback() || ip == "10.0.0.5".parse::<IpAddr>().unwrap();
        for looping in ["127.0.0.1:15001", "10.0.0.5:15001", "[::1]:15001", "127.0.0.1:15090"] {
            let e = check(&[cluster(&["10.0.0.9:80", looping])], &own, local).unwrap_err().to_string();
            assert!(e.starts_with("endpoints (cluster \"c\"): ") && e.contains(looping), "{e}");
        }
        // Another host on the listener's port, another local port: not loops.
        check(&[cluster(&["10.0.0.9:15001", "127.0.0.1:8080", "127.0.0.2:15090"])], &own, local).unwrap();
    }
}

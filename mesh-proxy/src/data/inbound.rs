//! Inbound: a redirected connection whose original destination is this namespace's own address
//! goes to the local application on the same address and port.
//!
//! The proxy connects from 127.0.0.6 (IPv4) / ::6 (IPv6), the sources mesh-init's rules let
//! through untouched: without them, the proxy's own connection to the pod address would be
//! redirected back to the proxy, in a loop. 127.0.0.6 is on `lo` already (all of 127/8 is). ::6
//! is not unless someone assigned it; then the proxy connects to `[::1]:port` instead, which the
//! rules never redirect (the application must listen on `::` or `::1`, as with Istio before 1.10).
//!
//! A connection that mesh-init's TPROXY rules delivered to a transparent listener is handed over
//! from the client's own address instead (a transparent socket bound to it, carrying the TPROXY
//! mark): the application sees who called, which is why one chooses TPROXY. The rules route the
//! application's answers back to the proxy: the hand-off's mark is saved on its connection
//! (CONNMARK) and restored on the answers, which the mark's route table delivers locally.

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;

use crate::{
    config::DEFAULT_CONNECT_TIMEOUT,
    data::{socket, tcp},
};

pub const INBOUND_SOURCE_V4: IpAddr = IpAddr::V4(mesh_common::INBOUND_PASSTHROUGH_V4);
pub const INBOUND_SOURCE_V6: IpAddr = IpAddr::V6(mesh_common::INBOUND_PASSTHROUGH_V6);

/// The addresses of this network namespace's interfaces.
#[derive(Debug, Default, Clone)]
pub struct LocalAddrs(HashSet<IpAddr>);

impl LocalAddrs {
    /// Reads the interface addresses (`getifaddrs`).
    pub fn discover() -> io::Result<Self> {
        let mut set = HashSet::new();
        for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(addr) = ifa.address else { continue };
            if let Some(v4) = addr.as_sockaddr_in() {
                set.insert(IpAddr::V4(v4.ip()));
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                set.insert(IpAddr::V6(v6.ip()));
            }
        }
        Ok(Self(set))
    }

    #[cfg(test)]
    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Self(addrs.into_iter().collect())
    }

    /// Loopback addresses are always local; the rest must be on an interface.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.0.contains(&ip)
    }
}

/// Where the hand-off to the application comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// 127.0.0.6 / ::6 (REDIRECT, eBPF).
    Passthrough,
    /// The client's address, with the TPROXY mark (a transparent listener).
    Client { mark: u32 },
}

/// Hands a connection redirected to this namespace's `dst` to the local application listening there.
/// `sessions` counts them.
pub async fn serve(
    sessions: &Counter,
    stream: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    source: Source,
    idle: Duration,
) {
    sessions.inc();
    let upstream = match source {
        Source::Passthrough => connect_local(dst, DEFAULT_CONNECT_TIMEOUT).await,
        Source::Client { mark } => socket::connect_transparent(dst, peer.ip(), mark, DEFAULT_CONNECT_TIMEOUT).await,
    };
    tcp::splice_logged(idle, stream, upstream, peer, dst, "inbound", "InboundPassthroughCluster").await;
}

/// Connects to the local application at `dst` from the inbound passthrough source.
pub async fn connect_local(dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match dst {
        SocketAddr::V4(_) => socket::connect(dst, Some(INBOUND_SOURCE_V4), timeout).await,
        SocketAddr::V6(_) => match socket::connect(dst, Some(INBOUND_SOURCE_V6), timeout).await {
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => {
                // From the pod's own address the connection would be redirected back to us.
                let local = SocketAddr::new(Ipv6Addr::LOCALHOST.into(), dst.port());
                tracing::debug!(%dst, %local, "::6 is not on lo; connecting to the app over ::1");
                socket::connect(local, None, timeout).await
            }
            r => r,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_local_app_sees_127_0_0_6() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = connect_local(l.local_addr().unwrap(), Duration::from_secs(1)).await.unwrap();
        let (_, peer) = l.accept().await.unwrap();
        assert_eq!(peer.ip(), INBOUND_SOURCE_V4);
    }

    #[test]
    fn loopback_and_interface_addresses_are_local() {
        let local = LocalAddrs::discover().unwrap();
        assert!(local.contains("127.0.0.1".parse().unwrap()));
        assert!(local.contains("127.9.9.9".parse().unwrap()));
        assert!(local.contains("::1".parse().unwrap()));
        assert!(!local.contains("192.0.2.1".parse().unwrap()));
        let given = LocalAddrs::from_addrs(["10.200.0.1".parse().unwrap()]);
        assert!(given.contains("10.200.0.1".parse().unwrap()));
    }
}

//! The destination a redirected connection was originally addressed to.
//!
//! iptables `REDIRECT` rewrites the destination to the proxy's port; conntrack remembers the
//! original, which `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv4) or
//! `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` (IPv6) returns. Both need no privilege.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where the client meant to go, and whether that came from the kernel's NAT record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OriginalDst {
    pub addr: SocketAddr,
    /// False when there was no NAT record and `addr` is just the local address the client dialled
    /// (a connection steered without NAT, or one made straight to the listener).
    pub redirected: bool,
}

/// Reads the original destination of an accepted connection, falling back to its local address.
pub fn original_dst(stream: &TcpStream) -> std::io::Result<OriginalDst> {
    let local = stream.local_addr()?;
    let nat = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).ok().map(|sin| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            ))
        }),
        SocketAddr::V6(l) => {
            // A v4 client on a dual-stack socket: the NAT record is an IPv4 one.
            if l.ip().to_ipv4_mapped().is_some() {
                getsockopt(stream, sockopt::OriginalDst).ok().map(|sin| {
                    SocketAddr::V4(SocketAddrV4::new(
                        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                        u16::from_be(sin.sin_port),
                    ))
                })
            } else {
                getsockopt(stream, sockopt::Ip6tOriginalDst).ok().map(|sin6| {
                    SocketAddr::V6(SocketAddrV6::new(
                        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                        u16::from_be(sin6.sin6_port),
                        0,
                        0,
                    ))
                })
            }
        }
    };
    let local = canonical(local);
    Ok(match nat {
        // conntrack also answers for connections it tracked but did not rewrite.
        Some(addr) if addr != local => OriginalDst { addr, redirected: true },
        _ => OriginalDst { addr: local, redirected: false },
    })
}

/// `::ffff:a.b.c.d` as the IPv4 address it is, so routes written in IPv4 match.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_nat_the_local_address_is_used() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _c = TcpStream::connect(addr).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        assert_eq!(original_dst(&s).unwrap(), OriginalDst { addr, redirected: false });
    }

    #[test]
    fn mapped_addresses_become_ipv4() {
        assert_eq!(canonical("[::ffff:10.0.0.1]:80".parse().unwrap()), "10.0.0.1:80".parse().unwrap());
        assert_eq!(canonical("[fd00::1]:80".parse().unwrap()), "[fd00::1]:80".parse().unwrap());
    }
}

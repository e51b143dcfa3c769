//! Where a redirected connection was going: `SO_ORIGINAL_DST`.
//!
//! With nat REDIRECT, conntrack remembers the destination the client dialled and answers this
//! socket option on the accepted socket; with the eBPF mode, a cgroup getsockopt program answers
//! it from a map. Either way the reader's code is this.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
};

use nix::sys::socket::{getsockopt, sockopt};

/// The original destination of an accepted connection, if it was redirected. `is_ipv6` is the
/// family of the accepted socket (IPv6 sockets are asked with `IP6T_SO_ORIGINAL_DST`).
pub fn original_dst<F: AsFd>(sock: &F, is_ipv6: bool) -> nix::Result<SocketAddr> {
    if is_ipv6 {
        let sa = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, sa.sin6_scope_id)))
    } else {
        let sa = getsockopt(sock, sockopt::OriginalDst)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
    }
}

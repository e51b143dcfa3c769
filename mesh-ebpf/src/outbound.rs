//! Outbound capture: a TCP connect that should go through the proxy is rewritten, before the
//! kernel routes it, to the proxy's outbound port on loopback; the destination the application
//! asked for is kept by socket cookie until `sock_ops` sees the connection established.
//!
//! The decision follows the iptables mode's `ISTIO_OUTPUT` chain, in the same order: proxy
//! UID/GID, loopback, excluded ports, included ports, excluded CIDRs, included CIDRs.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_current_uid_gid, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};
use mesh_ebpf_common::{
    is_loopback, is_mapped_v4, mapped_v4, Addr, Config, Counter, OrigDst, PortSet, AF_INET, AF_INET6,
    CFG_HAS_INCLUDE_OUTBOUND_PORTS, CFG_INCLUDE_ALL_CIDRS,
};

use crate::{
    ctx::{bytes, read_ip6},
    maps::{cidr_in, config, count, port_in, EXCLUDE_CIDRS, INCLUDE_CIDRS, ORIG_BY_COOKIE, PROXY_GIDS, PROXY_UIDS},
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Allow the connect (a cgroup sock_addr program returning 0 would fail it with EPERM).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: `sa` is the program's context, read and written at the fields' own widths.
    unsafe {
        let dst = mapped_v4(read_volatile(addr_of!((*sa).user_ip4)));
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if let Some((to, to_port)) = redirect(&ctx, dst, port, AF_INET) {
            write_volatile(addr_of_mut!((*sa).user_ip4), to[3]);
            write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(to_port) as u32);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if !is_tcp(sa) {
        return ALLOW;
    }
    // SAFETY: as in connect4; IPv6 words one at a time.
    unsafe {
        let dst = read_ip6(addr_of!((*sa).user_ip6));
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if let Some((to, to_port)) = redirect(&ctx, dst, port, AF_INET6) {
            let w = addr_of_mut!((*sa).user_ip6) as *mut u32;
            write_volatile(w, to[0]);
            write_volatile(w.add(1), to[1]);
            write_volatile(w.add(2), to[2]);
            write_volatile(w.add(3), to[3]);
            write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(to_port) as u32);
        }
    }
    ALLOW
}

/// A socket going away before its connect completed leaves no entry behind.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_BY_COOKIE.remove(cookie);
    ALLOW
}

#[inline(always)]
fn is_tcp(sa: *const aya_ebpf::bindings::bpf_sock_addr) -> bool {
    // SAFETY: the program's context.
    unsafe {
        read_volatile(addr_of!((*sa).type_)) == SOCK_STREAM && read_volatile(addr_of!((*sa).protocol)) == IPPROTO_TCP
    }
}

/// Decides, and for a captured connect records the original destination and returns the
/// loopback address (of the socket's family) and port to connect to instead. Inlined: a BPF
/// function returning a value this large would hand back a pointer to its stack, which the
/// verifier refuses.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, dst: Addr, port: u16, family: u16) -> Option<(Addr, u16)> {
    let cfg = config()?;
    let ids = bpf_get_current_uid_gid();
    let (uid, gid) = (ids as u32, (ids >> 32) as u32);
    if !captured(&cfg, &dst, port, uid, gid) {
        count(Counter::Bypassed);
        return None;
    }
    let v4 = is_mapped_v4(&dst);
    let orig = OrigDst { ip: dst, port, family: if v4 { AF_INET } else { AF_INET6 } };
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Without a record the proxy could not learn the destination: better uncaptured.
    ORIG_BY_COOKIE.insert(cookie, orig, 0).ok()?;
    count(Counter::Redirected);
    log_debug!(ctx, cfg, "connect uid={} to [{:i}]:{} -> proxy port {}", uid, bytes(&dst), port, cfg.outbound_port);
    let lo4 = u32::to_be(0x7f00_0001);
    let to = if family == AF_INET || v4 { mapped_v4(lo4) } else { [0, 0, 0, u32::to_be(1)] };
    Some((to, cfg.outbound_port))
}

#[inline(always)]
fn captured(cfg: &Config, dst: &Addr, port: u16, uid: u32, gid: u32) -> bool {
    // SAFETY: read-only lookups of plain values.
    if unsafe { PROXY_UIDS.get(uid).is_some() || PROXY_GIDS.get(gid).is_some() } {
        return false;
    }
    if is_loopback(dst) || port_in(PortSet::ExcludeOutbound, port) {
        return false;
    }
    if cfg.flags & CFG_HAS_INCLUDE_OUTBOUND_PORTS != 0 && port_in(PortSet::IncludeOutbound, port) {
        return true;
    }
    if cidr_in(&EXCLUDE_CIDRS, dst) {
        return false;
    }
    cfg.flags & CFG_INCLUDE_ALL_CIDRS != 0 || cidr_in(&INCLUDE_CIDRS, dst)
}

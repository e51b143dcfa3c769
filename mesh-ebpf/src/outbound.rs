//! Outbound capture: a TCP connect that should go through the proxy is rewritten, before the
//! kernel routes it, to the proxy's outbound port on loopback; the destination the application
//! asked for is kept in the socket's own state, where `conn` finds it once the connection is
//! established and `getpeername` shows it to the application, as NAT would.
//!
//! The decision follows the iptables mode's `ISTIO_OUTPUT` chain, in the same order: proxy
//! UID/GID (the socket's owner, see `owner`), loopback, excluded ports, included ports,
//! excluded CIDRs, included CIDRs.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    bindings::bpf_sock_addr, helpers::bpf_get_current_uid_gid, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use mesh_ebpf_common::{
    is_loopback, is_mapped_v4, mapped_v4, Addr, Config, Counter, OrigDst, PortSet, SockState, AF_INET, AF_INET6,
    CFG_HAS_INCLUDE_OUTBOUND_PORTS, CFG_INCLUDE_ALL_CIDRS, SOCK_DIALLED, SOCK_OWNER,
};

use crate::{
    ctx::{bytes, read_ip6},
    maps::{
        cidr_in, count, id_in, port_in, settings, sock_state, sock_state_or_create, EXCLUDE_CIDRS, INCLUDE_CIDRS,
        PROXY_GIDS, PROXY_UIDS,
    },
};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Let the call go on (a cgroup sock_addr program returning 0 fails it with EPERM).
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

/// What to do with a connect.
enum Verdict {
    Leave,
    /// Connect to this loopback address and port instead.
    Redirect(Addr, u16),
    /// Captured, but the destination cannot be kept: failing the connect is better than a
    /// connection the proxy cannot route, or one that bypasses it.
    Refuse,
}

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
        match decide(&ctx, dst, port, AF_INET) {
            Verdict::Leave => ALLOW,
            Verdict::Refuse => REFUSE,
            Verdict::Redirect(to, to_port) => {
                write_volatile(addr_of_mut!((*sa).user_ip4), to[3]);
                write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(to_port) as u32);
                ALLOW
            }
        }
    }
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
        match decide(&ctx, dst, port, AF_INET6) {
            Verdict::Leave => ALLOW,
            Verdict::Refuse => REFUSE,
            Verdict::Redirect(to, to_port) => {
                write_ip6(sa, &to);
                write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(to_port) as u32);
                ALLOW
            }
        }
    }
}

/// The peer of a redirected socket is the proxy on loopback; the application asked for, and is
/// shown, the destination it dialled (what NAT shows in the iptables mode).
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Some(orig) = dialled(sa) {
        if orig.family == AF_INET {
            // SAFETY: writable fields of a getpeername context.
            unsafe {
                write_volatile(addr_of_mut!((*sa).user_ip4), orig.ip[3]);
                write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(orig.port) as u32);
            }
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if let Some(orig) = dialled(sa) {
        // An IPv4 destination dialled from an IPv6 socket is kept IPv4-mapped, as the
        // application wrote it.
        // SAFETY: writable fields of a getpeername context.
        unsafe {
            write_ip6(sa, &orig.ip);
            write_volatile(addr_of_mut!((*sa).user_port), u16::to_be(orig.port) as u32);
        }
    }
    ALLOW
}

#[inline(always)]
fn is_tcp(sa: *const bpf_sock_addr) -> bool {
    // SAFETY: the program's context.
    unsafe {
        read_volatile(addr_of!((*sa).type_)) == SOCK_STREAM && read_volatile(addr_of!((*sa).protocol)) == IPPROTO_TCP
    }
}

/// The socket of a sock_addr context.
#[inline(always)]
fn socket_of(sa: *const bpf_sock_addr) -> *mut c_void {
    // SAFETY: the program's context; for these hooks `sk` is never null.
    unsafe { read_volatile(addr_of!((*sa).__bindgen_anon_1.sk)) as *mut c_void }
}

/// The destination a redirected socket dialled.
#[inline(always)]
fn dialled(sa: *const bpf_sock_addr) -> Option<OrigDst> {
    // SAFETY: the context's own socket; the state is copied out at once.
    unsafe {
        let state = sock_state(socket_of(sa));
        if state.is_null() || (*state).flags & SOCK_DIALLED == 0 {
            return None;
        }
        Some((*state).orig)
    }
}

/// # Safety
/// `sa` must be the program's context, of a hook whose `user_ip6` is writable.
#[inline(always)]
unsafe fn write_ip6(sa: *mut bpf_sock_addr, a: &Addr) {
    // SAFETY: the caller's promise: `user_ip6` of the context is writable, one word at a time.
    let w = unsafe { addr_of_mut!((*sa).user_ip6) } as *mut u32;
    // SAFETY: as above; the four words of `user_ip6`.
    unsafe {
        write_volatile(w, a[0]);
        write_volatile(w.add(1), a[1]);
        write_volatile(w.add(2), a[2]);
        write_volatile(w.add(3), a[3]);
    }
}

/// Decides, and for a captured connect records the original destination. Inlined: a BPF
/// function returning a value this large would hand back a pointer to its stack, which the
/// verifier refuses.
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: Addr, port: u16, family: u16) -> Verdict {
    let Some((generation, cfg)) = settings() else { return Verdict::Leave };
    let sk = socket_of(ctx.sock_addr);
    // SAFETY: the context's own socket.
    let state = unsafe { sock_state(sk) };
    // SAFETY: non-null state of this socket, read at once.
    let owner = unsafe {
        (!state.is_null() && (*state).flags & SOCK_OWNER != 0).then(|| ((*state).owner_uid, (*state).owner_gid))
    };
    let (uid, gid) = owner.unwrap_or_else(|| {
        // Created before the programs were attached: the connecting thread is the best guess.
        let ids = bpf_get_current_uid_gid();
        (ids as u32, (ids >> 32) as u32)
    });
    if !captured(generation, &cfg, &dst, port, uid, gid) {
        if !state.is_null() {
            // A socket connected again, elsewhere: its peer is no longer a dialled destination.
            // SAFETY: this socket's state.
            unsafe { (*state).flags &= !SOCK_DIALLED };
        }
        count(Counter::Bypassed);
        return Verdict::Leave;
    }
    let v4 = is_mapped_v4(&dst);
    let orig = OrigDst { ip: dst, port, family: if v4 { AF_INET } else { AF_INET6 } };
    let mut init = SockState { orig, flags: SOCK_DIALLED, ..Default::default() };
    // SAFETY: the context's own socket.
    let state = if state.is_null() { unsafe { sock_state_or_create(sk, &mut init) } } else { state };
    if state.is_null() {
        count(Counter::NotRecorded);
        return Verdict::Refuse;
    }
    // SAFETY: this socket's state (just created with the same values, or an older one).
    unsafe {
        (*state).orig = orig;
        (*state).flags |= SOCK_DIALLED;
    }
    count(Counter::Redirected);
    log_debug!(ctx, "connect uid={} to [{:i}]:{} -> proxy port {}", uid, bytes(&dst), port, cfg.outbound_port);
    let lo4 = u32::to_be(0x7f00_0001);
    let to = if family == AF_INET || v4 { mapped_v4(lo4) } else { [0, 0, 0, u32::to_be(1)] };
    Verdict::Redirect(to, cfg.outbound_port)
}

#[inline(always)]
fn captured(generation: u32, cfg: &Config, dst: &Addr, port: u16, uid: u32, gid: u32) -> bool {
    if id_in(&PROXY_UIDS, generation, uid) || id_in(&PROXY_GIDS, generation, gid) {
        return false;
    }
    if is_loopback(dst) || port_in(generation, PortSet::ExcludeOutbound, port) {
        return false;
    }
    if cfg.flags & CFG_HAS_INCLUDE_OUTBOUND_PORTS != 0 && port_in(generation, PortSet::IncludeOutbound, port) {
        return true;
    }
    if cidr_in(&EXCLUDE_CIDRS, generation, dst) {
        return false;
    }
    cfg.flags & CFG_INCLUDE_ALL_CIDRS != 0 || cidr_in(&INCLUDE_CIDRS, generation, dst)
}

//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` and `getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)` as
//! netfilter would answer them, so the proxy's code is the same in both modes:
//! - the proxy's end of a redirected connection (`conn` put the destination in its socket's
//!   state when it was established): the address the application asked for;
//! - any other socket, which no NAT touched (inbound connections steered by `sk_lookup` keep
//!   their destination): its own local address, as conntrack answers for an un-NATed
//!   connection. The proxy's outbound port is left out: there, no entry means a lost entry, and
//!   the kernel's error is the honest answer.

use core::{
    ffi::c_void,
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use mesh_ebpf_common::{
    is_mapped_v4, Counter, OrigDst, AF_INET, AF_INET6, SOCK_ANSWER, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
};

use crate::{
    ctx::{bpf_sock_pair, bytes},
    maps::{count, settings, sock_state},
};

/// Let the call return (with whatever `retval` now says) rather than fail it with EPERM.
const ALLOW: i32 = 1;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn getsockopt(ctx: SockoptContext) -> i32 {
    answer(&ctx);
    ALLOW
}

fn answer(ctx: &SockoptContext) {
    let so = ctx.sockopt;
    // SAFETY: `so` is the program's context; its fields are read at their own width.
    let (level, optname) = unsafe { (read_volatile(addr_of!((*so).level)), read_volatile(addr_of!((*so).optname))) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    // SAFETY: the context's socket field, read at its own width.
    let sk = unsafe { read_volatile(addr_of!((*so).__bindgen_anon_1.sk)) };
    if sk.is_null() {
        return;
    }
    // SAFETY: the context's non-null socket; the state is copied out at once.
    let answer = unsafe {
        let state = sock_state(sk as *mut c_void);
        (!state.is_null() && (*state).flags & SOCK_ANSWER != 0).then(|| (*state).orig)
    };
    let orig = match answer {
        Some(orig) => orig,
        None => {
            let Some((_, cfg)) = settings() else { return };
            // SAFETY: non-null socket of the context.
            let pair = unsafe { bpf_sock_pair(sk) };
            if pair.src_port == cfg.outbound_port {
                count(Counter::OrigDstMissed);
                log_debug!(ctx, "no original destination for [{:i}]:{}", bytes(&pair.dst_ip), pair.dst_port);
                return;
            }
            let v4 = is_mapped_v4(&pair.src_ip);
            OrigDst { ip: pair.src_ip, port: pair.src_port, family: if v4 { AF_INET } else { AF_INET6 } }
        }
    };
    let written = if level == SOL_IP { write_v4(ctx, &orig) } else { write_v6(ctx, &orig) };
    if written {
        count(Counter::OrigDstAnswered);
        log_debug!(ctx, "SO_ORIGINAL_DST [{:i}]:{}", bytes(&orig.ip), orig.port);
    }
}

/// The user's buffer if it holds `len` bytes.
#[inline(always)]
fn buffer(ctx: &SockoptContext, len: usize) -> Option<*mut u8> {
    let so = ctx.sockopt;
    // SAFETY: context fields; the verifier checks every access to the buffer against `end`.
    unsafe {
        let start = (*so).__bindgen_anon_2.optval as *mut u8;
        let end = (*so).__bindgen_anon_3.optval_end as *mut u8;
        if start.add(len) > end {
            return None;
        }
        Some(start)
    }
}

#[inline(always)]
fn finish(ctx: &SockoptContext, len: usize) {
    // SAFETY: writable fields of a getsockopt context.
    unsafe {
        write_volatile(addr_of_mut!((*ctx.sockopt).optlen), len as i32);
        write_volatile(addr_of_mut!((*ctx.sockopt).retval), 0);
    }
}

/// `struct sockaddr_in`: family, port (network order), address, 8 zero bytes.
fn write_v4(ctx: &SockoptContext, orig: &OrigDst) -> bool {
    if orig.family != AF_INET {
        return false;
    }
    let Some(p) = buffer(ctx, SOCKADDR_IN_LEN) else { return false };
    // SAFETY: `p` holds SOCKADDR_IN_LEN bytes (checked above).
    unsafe {
        write_volatile(p as *mut u16, AF_INET);
        write_volatile(p.add(2) as *mut u16, orig.port.to_be());
        write_volatile(p.add(4) as *mut u32, orig.ip[3]);
        write_volatile(p.add(8) as *mut u32, 0);
        write_volatile(p.add(12) as *mut u32, 0);
    }
    finish(ctx, SOCKADDR_IN_LEN);
    true
}

/// `struct sockaddr_in6`: family, port, flow info, address, scope id. An IPv4 destination asked
/// at the IPv6 level (a dual-stack socket) is answered IPv4-mapped.
fn write_v6(ctx: &SockoptContext, orig: &OrigDst) -> bool {
    let Some(p) = buffer(ctx, SOCKADDR_IN6_LEN) else { return false };
    // SAFETY: `p` holds SOCKADDR_IN6_LEN bytes (checked above).
    unsafe {
        write_volatile(p as *mut u16, AF_INET6);
        write_volatile(p.add(2) as *mut u16, orig.port.to_be());
        write_volatile(p.add(4) as *mut u32, 0);
        write_volatile(p.add(8) as *mut u32, orig.ip[0]);
        write_volatile(p.add(12) as *mut u32, orig.ip[1]);
        write_volatile(p.add(16) as *mut u32, orig.ip[2]);
        write_volatile(p.add(20) as *mut u32, orig.ip[3]);
        write_volatile(p.add(24) as *mut u32, 0);
    }
    finish(ctx, SOCKADDR_IN6_LEN);
    true
}

//! Inbound steering without NAT: `sk_lookup` on the pod's network namespace gives a captured
//! inbound connection to the proxy's inbound listener (recorded by `sock_ops` at listen). The
//! connection keeps its destination, which the proxy reads as its local address (and through
//! `SO_ORIGINAL_DST`, see `orig_dst`). Loopback destinations and the listener's own port are
//! left to the normal lookup.
//!
//! While no proxy listens (not started yet, crashed, OOM-killed, restarting) a captured
//! connection is refused, as the iptables mode's REDIRECT to a closed port refuses it: handing
//! it to the application would expose it without the proxy's policy. `--inbound-fail-open`
//! (`CFG_INBOUND_FAIL_OPEN`) lets the normal lookup have it instead.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_ebpf_common::{
    is_inbound_passthrough_source, is_loopback, Counter, PortSet, AF_INET, CFG_INBOUND, CFG_INBOUND_FAIL_OPEN,
    CFG_INCLUDE_ALL_INBOUND_PORTS, LISTENER_SLOT_V4, LISTENER_SLOT_V6,
};

use crate::{
    ctx::{addr, bytes},
    maps::{count, port_in, settings, INBOUND_LISTENERS},
};

const IPPROTO_TCP: u32 = 6;

/// With a socket assigned, SK_PASS delivers to it; without, the normal lookup goes on. SK_DROP
/// ends the lookup with no socket: the kernel answers the SYN with a reset (refused).
#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    steer(&ctx)
}

fn steer(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the program's context; fields read at their own width.
    let (family, proto, port, dst, src) = unsafe {
        let family = read_volatile(addr_of!((*l).family));
        (
            family,
            read_volatile(addr_of!((*l).protocol)),
            read_volatile(addr_of!((*l).local_port)) as u16,
            addr(family, addr_of!((*l).local_ip4), addr_of!((*l).local_ip6)),
            addr(family, addr_of!((*l).remote_ip4), addr_of!((*l).remote_ip6)),
        )
    };
    if proto != IPPROTO_TCP {
        return SK_PASS;
    }
    let Some((generation, cfg)) = settings() else { return SK_PASS };
    // The proxy handing a connection to the local application (from 127.0.0.6) would loop.
    if cfg.flags & CFG_INBOUND == 0
        || port == cfg.inbound_port
        || is_loopback(&dst)
        || is_inbound_passthrough_source(&src)
    {
        return SK_PASS;
    }
    if port_in(generation, PortSet::ExcludeInbound, port) {
        return SK_PASS;
    }
    if cfg.flags & CFG_INCLUDE_ALL_INBOUND_PORTS == 0 && !port_in(generation, PortSet::IncludeInbound, port) {
        return SK_PASS;
    }
    // An IPv4 connection can go to the IPv4 listener or, failing that, to a dual-stack IPv6
    // one (bpf_sk_assign refuses an IPv6-only socket, and then the IPv4 lookup goes on).
    let assigned = if family == AF_INET as u32 {
        INBOUND_LISTENERS.redirect_sk_lookup(ctx, LISTENER_SLOT_V4, 0).is_ok()
            || INBOUND_LISTENERS.redirect_sk_lookup(ctx, LISTENER_SLOT_V6, 0).is_ok()
    } else {
        INBOUND_LISTENERS.redirect_sk_lookup(ctx, LISTENER_SLOT_V6, 0).is_ok()
    };
    if assigned {
        count(Counter::InboundSteered);
        log_debug!(ctx, "inbound to [{:i}]:{} -> proxy port {}", bytes(&dst), port, cfg.inbound_port);
        return SK_PASS;
    }
    if cfg.flags & CFG_INBOUND_FAIL_OPEN != 0 {
        return SK_PASS;
    }
    count(Counter::InboundRefused);
    log_debug!(ctx, "inbound to [{:i}]:{} refused: no proxy listener", bytes(&dst), port);
    SK_DROP
}

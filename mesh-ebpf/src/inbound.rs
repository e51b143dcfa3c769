//! Inbound steering without NAT: `sk_lookup` on the pod's network namespace gives a captured
//! inbound connection to the proxy's inbound listener (recorded by `sock_ops` at listen). The
//! connection keeps its destination, which the proxy reads as its local address (and through
//! `SO_ORIGINAL_DST`, see `orig_dst`). Loopback destinations and the listener's own port are
//! left to the normal lookup.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{bindings::sk_action::SK_PASS, macros::sk_lookup, programs::SkLookupContext};
use mesh_ebpf_common::{
    is_inbound_passthrough_source, is_loopback, Counter, PortSet, AF_INET, CFG_INBOUND, CFG_INCLUDE_ALL_INBOUND_PORTS,
    LISTENER_SLOT_V4, LISTENER_SLOT_V6,
};

use crate::{
    ctx::{addr, bytes},
    maps::{config, count, port_in, INBOUND_LISTENERS},
};

const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn steer_inbound(ctx: SkLookupContext) -> u32 {
    steer(&ctx);
    // With a socket assigned, SK_PASS delivers to it; without, the normal lookup goes on.
    SK_PASS
}

fn steer(ctx: &SkLookupContext) {
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
        return;
    }
    let Some(cfg) = config() else { return };
    // The proxy handing a connection to the local application (from 127.0.0.6) would loop.
    if cfg.flags & CFG_INBOUND == 0
        || port == cfg.inbound_port
        || is_loopback(&dst)
        || is_inbound_passthrough_source(&src)
    {
        return;
    }
    if port_in(PortSet::ExcludeInbound, port) {
        return;
    }
    if cfg.flags & CFG_INCLUDE_ALL_INBOUND_PORTS == 0 && !port_in(PortSet::IncludeInbound, port) {
        return;
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
        log_debug!(ctx, cfg, "inbound to [{:i}]:{} -> proxy port {}", bytes(&dst), port, cfg.inbound_port);
    }
}

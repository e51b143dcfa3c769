//! Connection lifecycle, from `sock_ops` on the cgroup:
//! - the application's end established: the original destination moves from its cookie to its
//!   4-tuple, which is what the proxy's accepted socket can name in `getsockopt`;
//! - the proxy's accepted end established: ask for state callbacks, so that its close (always
//!   after the proxy asked for the destination) removes the entry. Removing at the application's
//!   close instead would race a client that sends and closes before the proxy accepts;
//! - a socket listening on the inbound port: remember it for `sk_lookup`, one slot per family;
//! - with `--accelerate`, both ends of loopback connections go into the sockhash.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_ebpf_common::{
    is_loopback, Config, Counter, SockPair, AF_INET, CFG_ACCELERATE, CFG_INBOUND, LISTENER_SLOT_V4, LISTENER_SLOT_V6,
};

use crate::{
    ctx::{bytes, sock_ops_pair},
    maps::{config, count, INBOUND_LISTENERS, LOCAL_SOCKS, ORIG_BY_COOKIE, ORIG_BY_PAIR},
};

/// sock_ops programs return 1 for success; the value is otherwise unused for these callbacks.
const DONE: u32 = 1;

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    let Some(cfg) = config() else { return DONE };
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let pair = sock_ops_pair(ctx.ops);
            rekey(&ctx, &cfg, &pair);
            accelerate(&ctx, &cfg, pair);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let pair = sock_ops_pair(ctx.ops);
            if pair.src_port == cfg.outbound_port && is_loopback(&pair.src_ip) {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            accelerate(&ctx, &cfg, pair);
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let pair = sock_ops_pair(ctx.ops);
                if pair.src_port == cfg.outbound_port {
                    let _ = ORIG_BY_PAIR.remove(pair.reversed());
                }
            }
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => listening(&ctx, &cfg),
        _ => {}
    }
    DONE
}

fn rekey(ctx: &SockOpsContext, cfg: &Config, pair: &SockPair) {
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: the value is copied out before the map is changed.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else { return };
    let _ = ORIG_BY_PAIR.insert(pair, orig, 0);
    let _ = ORIG_BY_COOKIE.remove(cookie);
    log_debug!(ctx, cfg, "established port {} for [{:i}]:{}", pair.src_port, bytes(&orig.ip), orig.port);
}

fn listening(ctx: &SockOpsContext, cfg: &Config) {
    if cfg.flags & CFG_INBOUND == 0 || ctx.local_port() != cfg.inbound_port as u32 {
        return;
    }
    let slot = if ctx.family() == AF_INET as u32 { LISTENER_SLOT_V4 } else { LISTENER_SLOT_V6 };
    // SAFETY: `ops` is the program's context, a full socket at this callback.
    match unsafe { INBOUND_LISTENERS.update(slot, ctx.ops, BPF_ANY as u64) } {
        Ok(()) => log_debug!(ctx, cfg, "inbound listener on port {} in slot {}", cfg.inbound_port, slot),
        Err(e) => log_debug!(ctx, cfg, "inbound listener on port {} not recorded: {}", cfg.inbound_port, e),
    }
}

fn accelerate(ctx: &SockOpsContext, cfg: &Config, mut pair: SockPair) {
    if cfg.flags & CFG_ACCELERATE == 0 || !is_loopback(&pair.src_ip) || !is_loopback(&pair.dst_ip) {
        return;
    }
    // SAFETY: `ops` is the program's context, an established full socket.
    if LOCAL_SOCKS.update(&mut pair, unsafe { &mut *ctx.ops }, BPF_ANY as u64).is_ok() {
        count(Counter::Accelerated);
    }
}

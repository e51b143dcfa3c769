//! Connection lifecycle, from `sock_ops` on the cgroup:
//! - the application's end established: its dialled destination (in its socket's state) is
//!   put under the connection's 4-tuple, the one thing the proxy's end can name, and the socket
//!   asks for state callbacks so that its close removes the entry if the proxy's end never
//!   took it;
//! - the proxy's accepted end established (before `accept()` returns it, even while the proxy
//!   is paused): the destination moves into that socket's own state, where `getsockopt` reads
//!   it, and goes with the socket. So an entry lives in `ORIG_BY_PAIR` only between the two
//!   handshakes, and nothing depends on how many connections are open or waiting;
//! - a socket listening on the inbound port: remember it for `sk_lookup`, one slot per family.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_LISTEN_CB, BPF_TCP_CLOSE,
    },
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_ebpf_common::{
    is_loopback, Config, Counter, SockState, AF_INET, CFG_INBOUND, LISTENER_SLOT_V4, LISTENER_SLOT_V6, SOCK_ANSWER,
    SOCK_DIALLED,
};

use crate::{
    ctx::{bytes, sock_ops_pair},
    maps::{count, settings, sock_state, sock_state_or_create, INBOUND_LISTENERS, ORIG_BY_PAIR},
};

/// sock_ops programs return 1 for success; the value is otherwise unused for these callbacks.
const DONE: u32 = 1;

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => application_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let Some((_, cfg)) = settings() {
                proxy_established(&ctx, &cfg);
            }
        }
        // Only the application's redirected sockets ask for state callbacks.
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            let _ = ORIG_BY_PAIR.remove(&sock_ops_pair(ctx.ops));
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => {
            if let Some((_, cfg)) = settings() {
                listening(&ctx, &cfg);
            }
        }
        _ => {}
    }
    DONE
}

/// The socket of the context, a full socket at the callbacks used here (null otherwise).
#[inline(always)]
fn socket_of(ctx: &SockOpsContext) -> *mut c_void {
    // SAFETY: the program's context.
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.ops).__bindgen_anon_2.sk)) as *mut c_void }
}

fn application_established(ctx: &SockOpsContext) {
    let sk = socket_of(ctx);
    if sk.is_null() {
        return;
    }
    // SAFETY: a full socket of the context; the state is copied out at once.
    let orig = unsafe {
        let state = sock_state(sk);
        if state.is_null() || (*state).flags & SOCK_DIALLED == 0 {
            return;
        }
        (*state).orig
    };
    let pair = sock_ops_pair(ctx.ops);
    if ORIG_BY_PAIR.insert(&pair, &orig, BPF_ANY as u64).is_err() {
        count(Counter::PairMapFull);
        return;
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    log_debug!(ctx, "established port {} for [{:i}]:{}", pair.src_port, bytes(&orig.ip), orig.port);
}

fn proxy_established(ctx: &SockOpsContext, cfg: &Config) {
    let pair = sock_ops_pair(ctx.ops);
    if pair.src_port != cfg.outbound_port || !is_loopback(&pair.src_ip) {
        return;
    }
    let app = pair.reversed();
    // SAFETY: the value is copied out before the map is changed.
    let Some(orig) = (unsafe { ORIG_BY_PAIR.get(&app) }).copied() else { return };
    let sk = socket_of(ctx);
    if sk.is_null() {
        return;
    }
    let mut init = SockState { orig, flags: SOCK_ANSWER, ..Default::default() };
    // SAFETY: a full socket of the context.
    let state = unsafe { sock_state_or_create(sk, &mut init) };
    if state.is_null() {
        // Left in the map: the application's close removes it.
        count(Counter::NotRecorded);
        return;
    }
    // SAFETY: this socket's state.
    unsafe {
        (*state).orig = orig;
        (*state).flags |= SOCK_ANSWER;
    }
    let _ = ORIG_BY_PAIR.remove(&app);
}

fn listening(ctx: &SockOpsContext, cfg: &Config) {
    if cfg.flags & CFG_INBOUND == 0 || ctx.local_port() != cfg.inbound_port as u32 {
        return;
    }
    let slot = if ctx.family() == AF_INET as u32 { LISTENER_SLOT_V4 } else { LISTENER_SLOT_V6 };
    // SAFETY: `ops` is the program's context, a full socket at this callback.
    match unsafe { INBOUND_LISTENERS.update(slot, ctx.ops, BPF_ANY as u64) } {
        Ok(()) => log_debug!(ctx, "inbound listener on port {} in slot {}", cfg.inbound_port, slot),
        Err(e) => log_debug!(ctx, "inbound listener on port {} not recorded: {}", cfg.inbound_port, e),
    }
}

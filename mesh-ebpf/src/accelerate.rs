//! `--accelerate`: data written on one end of a loopback app<->proxy connection is queued
//! straight on the other end's receive queue (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`),
//! skipping TCP/IP. Only sockets that `sock_ops` put in `LOCAL_SOCKS` ever reach this program,
//! and that happens only with `--accelerate`.

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    macros::sk_msg,
    programs::SkMsgContext,
};

use mesh_ebpf_common::Counter;

use crate::{
    ctx::sk_msg_pair,
    maps::{count, LOCAL_SOCKS},
};

#[sk_msg]
pub fn redirect_local(ctx: SkMsgContext) -> u32 {
    // The peer stored itself under its own view of the connection: ours, reversed.
    let peer = sk_msg_pair(ctx.msg).reversed();
    // Not found (peer not in the map, e.g. closed): the helper says SK_DROP, but the data must
    // still go the normal way, so the verdict is SK_PASS in every case.
    if LOCAL_SOCKS.redirect_msg(&ctx, peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::MsgRedirected);
    }
    SK_PASS
}

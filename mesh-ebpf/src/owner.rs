//! Who owns a socket: iptables' owner match (`-m owner --uid-owner 1337`, how the iptables mode
//! exempts the proxy) tests the credentials the socket was created with, not those of the
//! thread that later connects. A socket made by the application and connected after a
//! `setuid(1337)` is captured there; one made by the proxy and handed to (or connected from)
//! a root thread is not. So the creator's IDs are recorded in the socket's state when it is
//! created, and `outbound` decides by them.
//!
//! `bpf_get_current_uid_gid` gives the real IDs, where iptables reads the file system IDs; the
//! two differ only for a process that changed its effective IDs but not its real ones (a
//! set-user-ID program), which a proxy's UID is not.

use aya_ebpf::{helpers::bpf_get_current_uid_gid, macros::cgroup_sock, programs::SockContext, EbpfContext};
use mesh_ebpf_common::{SockState, SOCK_OWNER};

use crate::maps::sock_state_or_create;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// Let the socket be created (0 would fail `socket()` with EPERM).
const ALLOW: i32 = 1;

#[cgroup_sock(sock_create)]
pub fn sock_create(ctx: SockContext) -> i32 {
    // SAFETY: the program's context, read at the fields' own widths.
    let (ty, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if ty != SOCK_STREAM || protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let ids = bpf_get_current_uid_gid();
    let mut init =
        SockState { owner_uid: ids as u32, owner_gid: (ids >> 32) as u32, flags: SOCK_OWNER, ..Default::default() };
    // SAFETY: for this program type the context is the socket. Without storage (out of socket
    // option memory) `outbound` falls back to the connecting thread's IDs.
    let _ = unsafe { sock_state_or_create(ctx.as_ptr(), &mut init) };
    ALLOW
}

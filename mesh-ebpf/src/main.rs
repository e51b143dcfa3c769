//! The eBPF programs of `mesh-init ebpf`, one per hook. Each entry point is a thin wrapper: the
//! work is in the module named after what it does, and every entry point lets the operation
//! through whatever happens (a bug here must not break the pod's networking, only its capture).
//!
//! - [`owner`]: `cgroup/sock_create` records who created each TCP socket, the owner that
//!   iptables' owner match (and so the proxy's exemption) goes by.
//! - [`outbound`]: `cgroup/connect4`, `cgroup/connect6` rewrite captured connects to the proxy's
//!   outbound port on loopback and keep the original destination in the socket's own storage;
//!   `cgroup/getpeername4`, `getpeername6` show the application that destination as its peer.
//! - [`conn`]: `sock_ops` carries that destination from the application's socket to the proxy's
//!   accepted socket (by the connection's 4-tuple, between the two handshakes), and records the
//!   proxy's inbound listeners.
//! - [`orig_dst`]: `cgroup/getsockopt` answers `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`.
//! - [`inbound`]: `sk_lookup` hands inbound connections to the proxy's inbound listener, and
//!   refuses them while there is none (unless `--inbound-fail-open`).
//! - [`maps`]: every map and their accessors, and [`ctx`]: reading addresses and ports out of
//!   each context in the common form of `mesh_ebpf_common`.
//!
//! Built for the host (`cargo build --workspace`, clippy), the crate is an empty program that
//! says where it belongs, so workspace-wide commands work.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("mesh-ebpf holds eBPF programs: mesh-init's build.rs builds it for bpfel-unknown-none");
}

/// aya-log's `debug!`, only while `mesh-init ebpf --log` holds its lease (`CONTROL_LOG_UNTIL`).
#[cfg(target_arch = "bpf")]
macro_rules! log_debug {
    ($ctx:expr, $($arg:tt)+) => {
        if crate::maps::logging() {
            aya_log_ebpf::debug!($ctx, $($arg)+)
        }
    };
}

#[cfg(target_arch = "bpf")]
mod conn;
#[cfg(target_arch = "bpf")]
mod ctx;
#[cfg(target_arch = "bpf")]
mod inbound;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod orig_dst;
#[cfg(target_arch = "bpf")]
mod outbound;
#[cfg(target_arch = "bpf")]
mod owner;

/// The kernel's "license" section: the project's licence. None of the helpers used here is
/// GPL-only, so the verifier accepts it.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

//! Addresses and ports out of each hook's context, converted to the common form (network-order
//! words, IPv4 mapped; host-order ports). Each context has its own conventions, checked against
//! the kernel's `*_convert_ctx_access`:
//!
//! | context            | local port                 | remote port                          |
//! |--------------------|----------------------------|--------------------------------------|
//! | `bpf_sock_addr`    | -                          | `user_port`: network order, low 16   |
//! | `bpf_sock_ops`     | `local_port`: host order   | `remote_port`: network order, << 16  |
//! | `bpf_sock`         | `src_port`: host order     | `dst_port`: network order (`__be16`) |
//! | `bpf_sk_lookup`    | `local_port`: host order   | `remote_port`: network order         |
//!
//! IPv6 words are read one `u32` at a time: the verifier allows only 4-byte loads of them in
//! some contexts, and a struct copy could be compiled to wider loads. Both the IPv4 and the IPv6
//! fields are read whatever the family, and the value chosen afterwards: choosing the *field*
//! by family lets the compiler compute a context pointer with a variable offset, which the
//! verifier rejects ("dereference of modified ctx ptr"). The sock_addr context, whose IPv6
//! fields may not be read by IPv4 programs, is read per program in `outbound`.

use core::ptr::{addr_of, read_volatile};

use mesh_ebpf_common::{mapped_v4, Addr, SockPair, AF_INET};

/// Reads an IPv6 address field word by word.
///
/// # Safety
/// `p` must point into a context the program was given.
#[inline(always)]
pub unsafe fn read_ip6(p: *const [u32; 4]) -> Addr {
    let w = p as *const u32;
    // SAFETY: the caller's promise: `p` points to the four words of a context field.
    unsafe { [read_volatile(w), read_volatile(w.add(1)), read_volatile(w.add(2)), read_volatile(w.add(3))] }
}

/// The address of an IPv4 or IPv6 socket field pair in common form.
///
/// # Safety
/// Both pointers must point into the program's context.
#[inline(always)]
pub unsafe fn addr(family: u32, ip4: *const u32, ip6: *const [u32; 4]) -> Addr {
    // SAFETY: the caller's promise: both point into the context.
    let (v4, v6) = unsafe { (read_volatile(ip4), read_ip6(ip6)) };
    if family == AF_INET as u32 {
        mapped_v4(v4)
    } else {
        v6
    }
}

/// A `remote_port` field of `bpf_sock_ops` in host order.
#[inline(always)]
pub fn shifted_be_port(v: u32) -> u16 {
    u16::from_be((v >> 16) as u16)
}

/// The connection of a `sock_ops` socket, seen from that socket.
#[inline(always)]
pub fn sock_ops_pair(ops: *const aya_ebpf::bindings::bpf_sock_ops) -> SockPair {
    // SAFETY: `ops` is the program's context.
    unsafe {
        let family = read_volatile(addr_of!((*ops).family));
        SockPair {
            src_ip: addr(family, addr_of!((*ops).local_ip4), addr_of!((*ops).local_ip6)),
            dst_ip: addr(family, addr_of!((*ops).remote_ip4), addr_of!((*ops).remote_ip6)),
            src_port: read_volatile(addr_of!((*ops).local_port)) as u16,
            dst_port: shifted_be_port(read_volatile(addr_of!((*ops).remote_port))),
        }
    }
}

/// The connection of a `bpf_sock` (the socket of a `getsockopt` call), seen from that socket.
///
/// # Safety
/// `sk` must be the non-null socket pointer of the program's context.
#[inline(always)]
pub unsafe fn bpf_sock_pair(sk: *const aya_ebpf::bindings::bpf_sock) -> SockPair {
    // SAFETY: the caller's promise; fields read at their own width.
    unsafe {
        let family = read_volatile(addr_of!((*sk).family));
        SockPair {
            src_ip: addr(family, addr_of!((*sk).src_ip4), addr_of!((*sk).src_ip6)),
            dst_ip: addr(family, addr_of!((*sk).dst_ip4), addr_of!((*sk).dst_ip6)),
            src_port: read_volatile(addr_of!((*sk).src_port)) as u16,
            dst_port: u16::from_be(read_volatile(addr_of!((*sk).dst_port))),
        }
    }
}

/// An address as bytes, for aya-log's `{:i}`.
#[inline(always)]
pub fn bytes(a: &Addr) -> [u8; 16] {
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid for both;
    // the words are network order, so the bytes are the address as written.
    unsafe { core::mem::transmute::<Addr, [u8; 16]>(*a) }
}

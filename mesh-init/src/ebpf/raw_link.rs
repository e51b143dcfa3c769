//! What aya 0.14 does not offer for links, done with the `bpf(2)` commands aya would use:
//! - pinning the `getsockopt` program's link: there is no conversion from a `CgroupSockoptLink`
//!   to an `FdLink` (there is for every other cgroup program);
//! - the network namespace of a pinned `sk_lookup` link (`LinkInfo` keeps it private);
//! - the system call itself, for `probe`'s loads with an expected attach type.

use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

/// From `enum bpf_cmd` and `enum bpf_attach_type` (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub const BPF_PROG_LOAD: libc::c_long = 5;
pub const BPF_LINK_CREATE: libc::c_long = 28;
pub const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// `union bpf_attr` is larger; the kernel accepts a shorter prefix with the rest taken as zero.
type Attr = [u64; 8];

/// `bpf(cmd, attr, size of attr)`: `attr` is the command's member of `union bpf_attr`, as
/// 8-byte words (a prefix of it: the kernel takes the rest as zero).
pub fn bpf(cmd: libc::c_long, attr: &mut [u64]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed, laid out as the
    // command's member of `union bpf_attr`; pointers in it point to live buffers of the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `BPF_LINK_CREATE` of `prog` on `target` for `attach_type`, flags 0 (cgroup links are always
/// "multi"). Returns the link's file descriptor.
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> std::io::Result<OwnedFd> {
    let mut attr: Attr = [0; 8];
    // { u32 prog_fd; u32 target_fd; u32 attach_type; u32 flags; ... }
    attr[0] = u64::from(prog.as_raw_fd() as u32) | (u64::from(target.as_raw_fd() as u32) << 32);
    attr[1] = u64::from(attach_type);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_OBJ_GET`: a descriptor of the object pinned at `path`.
pub fn open_pinned(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr: Attr = [0; 8];
    // { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
    attr[0] = c.as_ptr() as u64;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The inode of the network namespace a netns link (`sk_lookup`) is attached to.
pub fn netns_of_link(link: BorrowedFd<'_>) -> std::io::Result<u64> {
    // struct bpf_link_info { u32 type; u32 id; u32 prog_id; union { ... struct { u32 netns_ino;
    // u32 attach_type; } netns; } } with the union 8-byte aligned, at offset 16.
    let mut info = [0u64; 8];
    let mut attr: Attr = [0; 8];
    // { u32 bpf_fd; u32 info_len; u64 info; }
    attr[0] = u64::from(link.as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info[2] & 0xffff_ffff)
}

/// `BPF_OBJ_PIN` of `fd` at `path` (on bpffs).
pub fn pin(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let mut attr: Attr = [0; 8];
    // { u64 pathname; u32 bpf_fd; u32 file_flags; ... }
    attr[0] = c.as_ptr() as u64;
    attr[1] = u64::from(fd.as_fd().as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

//! Inbound listeners that were already listening when the programs were attached.
//!
//! `sock_ops` records the proxy's inbound listener when it calls `listen()`. In a pod the init
//! container runs first, so that is enough; but a re-run after `--cleanup-only`, or a proxy that
//! was started first, would leave inbound steering without a socket until the proxy listens
//! again. So the loader looks for sockets listening on the inbound port in this network
//! namespace, owned by processes of the cgroup (and only those), takes a copy of each with
//! `pidfd_getfd(2)` and puts it in its family's slot, as `sock_ops` would have.

use std::{
    fs,
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use aya::maps::{MapData, SockMap};
use mesh_ebpf_common::{maps as names, LISTENER_SLOT_V4, LISTENER_SLOT_V6};

use super::cgroup::Cgroup;

/// A listening socket found in `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Listener {
    inode: u64,
    slot: u32,
}

/// Puts the cgroup's listeners on `port` into `INBOUND_LISTENERS`. Best effort: what cannot be
/// adopted is reported and left to `sock_ops` (the proxy's next `listen()`). Returns how many
/// were adopted.
pub fn adopt(ebpf: &mut aya::Ebpf, cgroup: &Cgroup, port: u16) -> usize {
    let mut listeners = Vec::new();
    for (file, slot) in [("tcp", LISTENER_SLOT_V4), ("tcp6", LISTENER_SLOT_V6)] {
        let path = Path::new("/proc/thread-self/net").join(file);
        if let Ok(text) = fs::read_to_string(&path) {
            listeners.extend(parse_listeners(&text, port).into_iter().map(|inode| Listener { inode, slot }));
        }
    }
    if listeners.is_empty() {
        return 0;
    }
    let Some(map) = ebpf.map_mut(names::INBOUND_LISTENERS) else { return 0 };
    let Ok(mut map) = SockMap::<&mut MapData>::try_from(map) else { return 0 };
    let mut adopted = 0;
    for pid in pids_of(&cgroup.path) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for entry in fds.filter_map(Result::ok) {
            let Ok(target) = fs::read_link(entry.path()) else { continue };
            let Some(inode) = socket_inode(&target.to_string_lossy()) else { continue };
            let Some(l) = listeners.iter().find(|l| l.inode == inode) else { continue };
            let Ok(fd_num) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
            match copy_fd(pid, fd_num).and_then(|fd| map.set(l.slot, &fd, 0).map_err(std::io::Error::other)) {
                Ok(()) => adopted += 1,
                Err(e) => eprintln!(
                    "mesh-init ebpf: warning: cannot adopt the listener on port {port} of process {pid} ({e}); \
                     inbound steering starts when it listens again"
                ),
            }
        }
    }
    adopted
}

/// Inodes of sockets in state LISTEN (0A) on `port`, from `/proc/net/tcp` or `tcp6`.
fn parse_listeners(text: &str, port: u16) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Processes of the cgroup and of every cgroup below it.
fn pids_of(cgroup: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if let Ok(children) = fs::read_dir(cgroup) {
        for child in children.filter_map(Result::ok).filter(|e| e.file_type().is_ok_and(|t| t.is_dir())) {
            pids.extend(pids_of(&child.path()));
        }
    }
    pids
}

/// A duplicate of process `pid`'s descriptor `fd` (`pidfd_open` + `pidfd_getfd`, Linux 5.6).
fn copy_fd(pid: i32, fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system calls with integer arguments; each returned descriptor is owned
    // exactly once below.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let copy = libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0);
        if copy < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(copy as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_on_the_port_only() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A98 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1337        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3A98 0100007F:B2C4 01 00000000:00000000 00:00000000 00000000  1337        0 4243 1 0000000000000000 20 4 30 10 -1
   2: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4244 1 0000000000000000 100 0 0 10 0
";
        assert_eq!(parse_listeners(text, 15000), vec![4242]);
        assert_eq!(parse_listeners(text, 8080), vec![4244]);
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
    }
}

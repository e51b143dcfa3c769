//! Entering a network namespace before doing anything else.
//!
//! `ip netns exec` remounts `/sys` privately, which hides the cgroup2 mount and bpffs from the
//! command it runs; so mesh-init joins the namespace itself with `setns(2)`, keeping the mount
//! namespace (and so cgroups and bpffs) of the caller. This is also what istio-iptables'
//! `--network-namespace` does.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("--netns {given:?}: {path} cannot be opened ({cause}); expected a name from `ip netns list` or a path such as /proc/PID/ns/net")]
    Open { given: String, path: PathBuf, cause: std::io::Error },
    #[error("--netns {given:?}: setns failed ({cause}); joining a network namespace needs CAP_SYS_ADMIN")]
    Join { given: String, cause: nix::Error },
}

/// Resolves `NAME` to `/run/netns/NAME`; anything with a `/` is taken as a path.
pub fn path_of(given: &str) -> PathBuf {
    if given.contains('/') {
        PathBuf::from(given)
    } else {
        Path::new("/run/netns").join(given)
    }
}

/// Moves the calling thread into the network namespace `given`. Call it before any other thread
/// exists (mesh-init is single-threaded until then), so that every socket and child process that
/// follows lives in that namespace.
pub fn enter(given: &str) -> Result<(), NetnsError> {
    let path = path_of(given);
    let file = File::open(&path).map_err(|cause| NetnsError::Open { given: given.into(), path, cause })?;
    setns(file, CloneFlags::CLONE_NEWNET).map_err(|cause| NetnsError::Join { given: given.into(), cause })
}

//! mesh-lab: the one harness for everything the tests and the benchmark create on this machine.
//!
//! Each thing is a guard that removes itself in `Drop`, which also runs when a test panics or
//! the bench is interrupted ([`interrupt`]), and carries a name `mesh-<tag>-<pid>-<n>`
//! ([`unique`]) so that `scripts/lib.sh`'s reaper can remove what a killed run left behind
//! (the `<pid>` is gone). The model is ztunnel's `NamespaceManager` and aya's test guards.
//!
//! - [`Netns`] (`netns.rs`): a network namespace, veth pairs between two of them, commands and
//!   threads inside it.
//! - [`Cgroup`] (`cgroup.rs`): a cgroup v2 directory under the cgroup2 mount (or nested in one,
//!   as a kubelet nests a pod's), and commands in it.
//! - [`Proc`], [`run`], [`check`], [`output`] (`process.rs`): long-running children killed on
//!   drop, with line waits on stdout; commands run to completion within a time limit.
//! - [`TempDir`], [`write_atomic`] (`tempdir.rs`): a scratch directory the proxy's user can read,
//!   and files replaced the way config tools replace them.
//! - [`free_port`] (`ports.rs`): loopback ports never handed out twice, outside the kernel's
//!   ephemeral range.
//! - [`wait_until`], [`try_wait_until`], `wait_until_async` (`wait.rs`): eventually-style waits
//!   that name what they waited for.
//! - [`privileged`]: the gate of every test that needs root: skip without it, fail under CI.
//!
//! Setting up (a namespace, a cgroup, a directory) panics on failure: it means the machine is
//! not fit (no root, no `ip`), a test cannot go on, and unwinding still runs every guard's drop.
//! Running a command returns a `Result`, because the bench carries on past a path that fails.

mod cgroup;
pub mod interrupt;
mod netns;
mod ports;
mod process;
mod tempdir;
mod wait;

use std::sync::atomic::{AtomicU32, Ordering};

pub use cgroup::{cgroup2_mount, Cgroup};
pub use netns::Netns;
pub use ports::free_port;
pub use process::{check, output, run, Proc, CHECK_LIMIT, LINE_LIMIT};
pub use tempdir::{write_atomic, TempDir};
#[cfg(feature = "tokio")]
pub use wait::wait_until_async;
pub use wait::{try_wait_until, wait_until};

/// A fresh `mesh-<tag>-<pid>-<n>`: unique within this process (the counter) and across processes
/// (the PID), and the shape `scripts/lib.sh`'s reaper parses to find leftovers of dead runs.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("mesh-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Whether a test that needs root (namespaces, cgroups, iptables) may run: true as root. Without
/// root it prints that the test is skipped and returns false, except when `CI` is set: then it
/// panics, because a CI run that silently skipped these tests would prove nothing.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: needs root for network namespaces, and CI is set: failing instead of skipping");
    }
    eprintln!("skipped {test}: needs root (network namespaces)");
    false
}

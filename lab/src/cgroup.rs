//! cgroup v2 directories: the eBPF mode attaches its programs to a cgroup, so a test's (or a
//! bench path's) "pod" is a cgroup of its own, never the root one.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::unique;

/// Where cgroup2 is mounted, from /proc/self/mountinfo: hybrid hosts (this one) mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup. Panics when there is none.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split_whitespace().nth(4)?;
            (post.split_whitespace().next() == Some("cgroup2")).then(|| PathBuf::from(mount))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo")
}

/// A cgroup directory `mesh-<tag>-<pid>-<n>` directly under the cgroup2 mount, or one nested in
/// such a directory ([`Cgroup::nested`]). On drop the directories it created are removed, with
/// every cgroup below them (leaves first, their processes killed): programs attached to them go
/// with them.
pub struct Cgroup {
    /// The directory; what `mesh-init ebpf --cgroup` takes.
    path: PathBuf,
    /// The outermost directory this guard created: what its drop removes.
    created: PathBuf,
}

impl Cgroup {
    /// Creates the directory; panics when it cannot (no cgroup2, not root).
    pub fn new(tag: &str) -> Cgroup {
        let path = cgroup2_mount().join(unique(tag));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Cgroup { created: path.clone(), path }
    }

    /// Creates `relative` (one or more components, `kubepods.slice/kubepods-pod1.slice`) below
    /// this cgroup, for tests of cgroups nested and named as a kubelet makes them. The guard
    /// removes what it created; this cgroup's own drop removes it too, whichever drops first.
    pub fn nested(&self, relative: impl AsRef<Path>) -> Cgroup {
        let relative = relative.as_ref();
        let first = relative.components().next().expect("a relative path with at least one component");
        let created = self.path.join(first);
        assert!(!created.exists(), "{} exists already", created.display());
        let path = self.path.join(relative);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("mkdir -p {}: {e}", path.display()));
        Cgroup { path, created }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `cmd`'s process join this cgroup before it executes, so everything the program
    /// does (its first connection included) is seen by programs attached to the cgroup.
    pub fn enter(&self, cmd: &mut Command) {
        // Built here, before the fork: the child may only do async-signal-safe work.
        let procs = CString::new(self.path.join("cgroup.procs").as_os_str().as_bytes()).expect("path without NUL");
        let join = move || -> io::Result<()> {
            // SAFETY: `procs` is a valid NUL-terminated string owned by the closure; open(2) is
            // async-signal-safe and allocates nothing.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was opened just above; the buffer is a 1-byte static. write(2) is
            // async-signal-safe. "0" means "the writing process".
            let written = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = io::Error::last_os_error();
            // SAFETY: `fd` is ours and closed once; close(2) is async-signal-safe.
            unsafe { libc::close(fd) };
            if written == 1 {
                Ok(())
            } else {
                Err(err)
            }
        };
        // SAFETY: `join` runs in the child between fork and exec and only calls open, write and
        // close on a path prepared before the fork: no allocation, no lock, nothing that another
        // thread of the parent could have held at fork time.
        unsafe {
            cmd.pre_exec(join);
        }
    }
}

/// Removes the cgroup `dir` and every cgroup below it, leaves first. A cgroup with processes or
/// children cannot be removed; killed processes leave it asynchronously, hence the retries.
fn remove_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    for _ in 0..50 {
        let pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = fs::remove_dir(dir);
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_tree(&self.created);
    }
}

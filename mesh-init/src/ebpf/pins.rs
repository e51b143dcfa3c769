//! bpffs and mesh-init's place in it: `<bpffs>/mesh-init/<cgroup>/`, one directory per cgroup,
//! holding that cgroup's pinned maps and links. A pinned link keeps its program attached after
//! mesh-init exits; removing the pin detaches it.

use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::cgroup::{mounts_of_type, CgroupError};

/// Top directory of mesh-init's pins inside bpffs.
pub const TOP: &str = "mesh-init";

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("--bpffs {}: {action} failed ({cause})", path.display())]
    Io { path: PathBuf, action: &'static str, cause: std::io::Error },
    #[error("--bpffs {}: mounting bpffs failed ({cause}); it needs CAP_SYS_ADMIN", path.display())]
    Mount { path: PathBuf, cause: nix::Error },
    #[error(transparent)]
    Mounts(#[from] CgroupError),
}

/// A mounted bpffs.
#[derive(Debug, Clone)]
pub struct Bpffs {
    pub root: PathBuf,
}

impl Bpffs {
    /// `path` as a bpffs, mounted there first if it is not one (a fresh node has none).
    pub fn ensure(path: &Path) -> Result<Self, PinsError> {
        let io = |action| move |cause| PinsError::Io { path: path.into(), action, cause };
        std::fs::create_dir_all(path).map_err(io("creating the mount point"))?;
        let real = path.canonicalize().map_err(io("resolving the path"))?;
        if !mounts_of_type("bpf")?.contains(&real) {
            mount(Some("bpf"), &real, Some("bpf"), MsFlags::empty(), None::<&str>)
                .map_err(|cause| PinsError::Mount { path: path.into(), cause })?;
            if !in_host_mounts() {
                eprintln!(
                    "mesh-init ebpf: warning: mounted a new bpffs at {}. If this is a container's own mount \
                     namespace, that bpffs (and the pins that keep the programs attached) goes away with the \
                     container: mount the host's /sys/fs/bpf into it instead",
                    real.display()
                );
            }
        }
        Ok(Self { root: real })
    }

    /// Every mounted bpffs (for `status`, which has no `--bpffs`).
    pub fn mounted() -> Result<Vec<Self>, PinsError> {
        let mut roots = mounts_of_type("bpf")?;
        roots.dedup();
        Ok(roots.into_iter().map(|root| Self { root }).collect())
    }

    pub fn dir_for(&self, name: &str) -> PathBuf {
        self.root.join(TOP).join(name)
    }

    pub fn create_dir_for(&self, name: &str) -> Result<PathBuf, PinsError> {
        let dir = self.dir_for(name);
        std::fs::create_dir_all(&dir).map_err(|cause| PinsError::Io {
            path: dir.clone(),
            action: "creating the pin directory",
            cause,
        })?;
        Ok(dir)
    }

    /// The per-cgroup directories, sorted by name.
    pub fn cgroup_dirs(&self) -> Result<Vec<(String, PathBuf)>, PinsError> {
        let top = self.root.join(TOP);
        let entries = match std::fs::read_dir(&top) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(cause) => return Err(PinsError::Io { path: top, action: "listing", cause }),
        };
        let mut dirs: Vec<_> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        dirs.sort();
        Ok(dirs)
    }
}

/// True when this process is known to be in the host's mount namespace: newer kernels give the
/// initial one a fixed inode number (`PROC_MNT_INIT_INO`); elsewhere nothing is known.
fn in_host_mounts() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    const PROC_MNT_INIT_INO: u64 = 0xEFFF_FFF8;
    std::fs::metadata("/proc/self/ns/mnt").is_ok_and(|m| m.ino() == PROC_MNT_INIT_INO)
}

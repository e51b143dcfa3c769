//! The cgroup the programs attach to: found, checked, and named.
//!
//! The programs act on every socket of the cgroup and of every cgroup below it. Attached to the
//! root of the hierarchy they would capture every connection of the machine, so the root is
//! refused, and nothing is ever defaulted.

use std::{
    fs::File,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

/// `--cgroup` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 file system is mounted (none in /proc/self/mountinfo); the eBPF mode needs cgroup v2")]
    NoCgroup2,
    #[error(
        "--cgroup {}: no such directory ({cause}). If mesh-init runs under `ip netns exec`, that command \
         remounts /sys and hides the cgroup2 mount: run `mesh-init ebpf --netns NAME ...` instead, which joins \
         the namespace and keeps the mounts",
        path.display()
    )]
    Missing { path: PathBuf, cause: std::io::Error },
    #[error("--cgroup {}: not a directory of the cgroup2 hierarchy mounted at {}", path.display(), mount.display())]
    Outside { path: PathBuf, mount: PathBuf },
    #[error(
        "--cgroup {}: this is the root of the cgroup2 hierarchy; programs there would capture every connection \
         of the machine. Give the pod's own cgroup",
        path.display()
    )]
    Root { path: PathBuf },
    #[error("--cgroup {}: cannot be opened ({cause})", path.display())]
    Open { path: PathBuf, cause: std::io::Error },
    #[error(
        "refusing to attach inbound steering (sk_lookup) to the machine's own network namespace: run in the \
         pod's namespace with --netns NAME|PATH, or turn inbound capture off with --istio-inbound-ports ''"
    )]
    HostNetns,
    #[error("{}: {cause}", path.display())]
    Proc { path: PathBuf, cause: std::io::Error },
}

/// A checked cgroup v2 directory, open for attaching.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
    /// Name of its pin directory: the path below the cgroup2 mount, escaped (see [`pin_name`]).
    pub name: String,
    pub file: File,
}

impl Cgroup {
    pub fn open(path: &Path) -> Result<Self, CgroupError> {
        let real = path.canonicalize().map_err(|cause| CgroupError::Missing { path: path.into(), cause })?;
        let relative = relative_to_mount(&real)?;
        let file = File::open(&real).map_err(|cause| CgroupError::Open { path: path.into(), cause })?;
        Ok(Self { name: pin_name(&relative), path: real, file })
    }

    /// The pin directory's name for `path`, which need not exist any more (a deleted pod).
    pub fn name_for_cleanup(path: &Path) -> Result<String, CgroupError> {
        let real = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
        Ok(pin_name(&relative_to_mount(&real)?))
    }
}

/// Mount points of cgroup2 file systems, from `/proc/self/mountinfo`.
pub fn cgroup2_mounts() -> Result<Vec<PathBuf>, CgroupError> {
    mounts_of_type("cgroup2")
}

/// Mount points of file systems of type `fstype` (`cgroup2`, `bpf`).
pub fn mounts_of_type(fstype: &str) -> Result<Vec<PathBuf>, CgroupError> {
    let path = PathBuf::from("/proc/self/mountinfo");
    let text = std::fs::read_to_string(&path).map_err(|cause| CgroupError::Proc { path, cause })?;
    Ok(parse_mountinfo(&text, fstype))
}

/// Lines are `id parent dev root mountpoint options [optional...] - fstype source superoptions`;
/// octal escapes (`\040` for a space) are decoded.
fn parse_mountinfo(text: &str, fstype: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == fstype).then(|| PathBuf::from(unescape(mount_point)))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The path below the (innermost) cgroup2 mount holding `real`; the root itself is refused.
fn relative_to_mount(real: &Path) -> Result<PathBuf, CgroupError> {
    relative_to(real, &cgroup2_mounts()?)
}

fn relative_to(real: &Path, mounts: &[PathBuf]) -> Result<PathBuf, CgroupError> {
    let mount = mounts.iter().filter(|m| real.starts_with(m)).max_by_key(|m| m.components().count()).ok_or_else(
        || match mounts.first() {
            Some(m) => CgroupError::Outside { path: real.into(), mount: m.clone() },
            None => CgroupError::NoCgroup2,
        },
    )?;
    let relative = real.strip_prefix(mount).expect("starts_with checked").to_path_buf();
    if relative.components().all(|c| matches!(c, Component::CurDir)) {
        return Err(CgroupError::Root { path: real.into() });
    }
    Ok(relative)
}

/// The pin directory's name for a cgroup path below the mount: one directory per cgroup, named
/// so that it reads back ([`cgroup_of_pin_name`]). `/` cannot be in a name, and bpffs refuses
/// names with a `.` (`EPERM`), which every systemd-driver pod cgroup has
/// (`kubepods-burstable-pod<uid>.slice`); so both are percent-escaped, and `%` itself:
/// `kubepods.slice/pod1` -> `kubepods%2Eslice%2Fpod1`.
pub fn pin_name(relative: &Path) -> String {
    let mut name = String::new();
    for c in relative.to_string_lossy().chars() {
        match c {
            '%' => name.push_str("%25"),
            '/' => name.push_str("%2F"),
            '.' => name.push_str("%2E"),
            c => name.push(c),
        }
    }
    name
}

/// The cgroup path (below the cgroup2 mount) a pin directory stands for: [`pin_name`] undone.
pub fn cgroup_of_pin_name(name: &str) -> String {
    let mut path = String::new();
    let mut rest = name;
    while let Some(at) = rest.find('%') {
        path.push_str(&rest[..at]);
        let (c, skip) = match rest.get(at + 1..at + 3) {
            Some("25") => ('%', 3),
            Some("2F") => ('/', 3),
            Some("2E") => ('.', 3),
            _ => ('%', 1),
        };
        path.push(c);
        rest = &rest[at + skip..];
    }
    path.push_str(rest);
    path
}

/// Fails when the calling thread is in the machine's own network namespace (see
/// [`in_host_netns`]).
pub fn refuse_host_netns() -> Result<(), CgroupError> {
    if in_host_netns()? {
        return Err(CgroupError::HostNetns);
    }
    Ok(())
}

/// Whether the calling thread is in the machine's own network namespace. Recognised by its
/// fixed inode number (`PROC_NET_INIT_INO`, newer kernels; dynamic inode numbers start at
/// 0xF0000000 so nothing else can have it), or else as PID 1's namespace when we are in the
/// initial PID namespace and may read PID 1's. In a container with its own PID namespace on an
/// older kernel the check cannot tell and answers no: there, the namespace is the pod's.
pub fn in_host_netns() -> Result<bool, CgroupError> {
    const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;
    const PROC_NET_INIT_INO: u64 = 0xEFFF_FFF9;
    let ino = |p: &str| std::fs::metadata(p).map(|m| m.ino());
    let own = ino("/proc/thread-self/ns/net")
        .map_err(|cause| CgroupError::Proc { path: "/proc/thread-self/ns/net".into(), cause })?;
    Ok(own == PROC_NET_INIT_INO
        || (ino("/proc/self/ns/pid").ok() == Some(PROC_PID_INIT_INO) && ino("/proc/1/ns/net").ok() == Some(own)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_finds_cgroup2_with_escapes() {
        let text = "\
30 23 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
40 23 0:33 / /mnt/my\\040cg rw - cgroup2 none rw
";
        assert_eq!(
            parse_mountinfo(text, "cgroup2"),
            [PathBuf::from("/sys/fs/cgroup/unified"), PathBuf::from("/mnt/my cg")]
        );
        assert!(parse_mountinfo(text, "bpf").is_empty());
    }

    #[test]
    fn the_root_of_the_hierarchy_is_refused() {
        let mounts = [PathBuf::from("/sys/fs/cgroup/unified")];
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/unified/."] {
            let e = relative_to(Path::new(root), &mounts).unwrap_err();
            assert!(matches!(e, CgroupError::Root { .. }), "{root}: {e}");
            assert!(e.to_string().contains("every connection of the machine"), "{e}");
        }
        assert!(matches!(relative_to(Path::new("/sys/fs/cgroup"), &mounts), Err(CgroupError::Outside { .. })));
        assert!(matches!(relative_to(Path::new("/tmp/x"), &mounts), Err(CgroupError::Outside { .. })));
        assert!(matches!(relative_to(Path::new("/tmp/x"), &[]), Err(CgroupError::NoCgroup2)));
        assert_eq!(
            relative_to(Path::new("/sys/fs/cgroup/unified/kubepods/pod1"), &mounts).unwrap(),
            PathBuf::from("kubepods/pod1")
        );
    }

    #[test]
    fn a_missing_cgroup_names_ip_netns_exec() {
        let e = Cgroup::open(Path::new("/nonexistent/mesh-test-cgroup")).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("--cgroup /nonexistent/mesh-test-cgroup")
                && msg.contains("ip netns exec")
                && msg.contains("--netns"),
            "{msg}"
        );
    }

    #[test]
    fn pin_names_read_back() {
        for p in [
            "mesh-test-1",
            "kubepods/burstable/pod1",
            "odd%2Fname/x%2E.%25%",
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12_34.slice",
        ] {
            let name = pin_name(Path::new(p));
            assert!(!name.contains('/') && !name.contains('.'), "{name}");
            assert_eq!(cgroup_of_pin_name(&name), p);
        }
        assert_eq!(pin_name(Path::new("kubepods.slice/pod1")), "kubepods%2Eslice%2Fpod1");
    }
}

//! Loading, configuring, attaching and pinning; and removing it all again.
//!
//! Only the programs the flags need are loaded (`probe::Hook::needed`). Every run writes the
//! new configuration into the inactive generation of the (pinned, reused) configuration maps
//! and then switches the active generation with one write, so the programs go from the old
//! configuration to the new one at one instant (see `mesh_ebpf_common`). When each pinned link
//! already runs a program with the same tag as the one just loaded, nothing is re-attached.
//! Otherwise (an upgrade, or inbound capture turned on or off) re-attaching is
//! make-before-break: each new link is pinned beside the old one and renamed over it. Until
//! the rename both programs are attached; they read the same maps and give the same answers,
//! and a connect already rewritten to loopback is left alone by the second. The rename drops
//! the last reference to the old link, which detaches it.
//!
//! Runs for the same cgroup are serialised by a lock on its pin directory, so two concurrent
//! runs cannot interleave their generation writes.

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapError},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, ProgramInfo,
        SkLookup, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use mesh_ebpf_common::{
    cidr_key, id_key, maps as names, CidrKey, Config, CONTROL_GENERATION, CONTROL_LOG_UNTIL, GENERATIONS,
    PORT_SETS_PER_GENERATION, PORT_SET_WORDS,
};
use nix::fcntl::{Flock, FlockArg};

use super::{
    cgroup::Cgroup,
    pins::Bpffs,
    plan::MapPlan,
    probe::{Hook, Missing},
    raw_link,
};

/// The object `mesh-init/build.rs` built from the `mesh-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// The program attached at `hook`: its name in the object, and its link's pin name.
pub const fn program(hook: Hook) -> (&'static str, &'static str) {
    match hook {
        Hook::Connect4 => ("connect4", "link-connect4"),
        Hook::Connect6 => ("connect6", "link-connect6"),
        Hook::GetPeerName4 => ("getpeername4", "link-getpeername4"),
        Hook::GetPeerName6 => ("getpeername6", "link-getpeername6"),
        Hook::SockCreate => ("sock_create", "link-sock-create"),
        Hook::SockOps => ("sock_ops", "link-sock-ops"),
        Hook::GetSockopt => ("getsockopt", "link-getsockopt"),
        Hook::SkLookup => ("steer_inbound", "link-sk-lookup"),
    }
}

/// Prefix of every link pin (maps are pinned by their upper-case names).
const LINK_PREFIX: &str = "link-";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("loading the eBPF object with maps pinned in {} failed: {cause}. If mesh-init was upgraded and a \
             map changed shape, remove the old pins with `mesh-init ebpf --cleanup-only --cgroup ...`", dir.display())]
    Load { dir: PathBuf, cause: Box<EbpfError> },
    #[error(transparent)]
    Unsupported(#[from] Missing),
    #[error("program {name}: {action} failed: {cause}")]
    Program { name: &'static str, action: &'static str, cause: Box<ProgramError> },
    #[error("program {name}: the link cannot be pinned: {reason}")]
    Link { name: &'static str, reason: String },
    #[error("map {name}: {action} failed: {cause}")]
    Map { name: &'static str, action: &'static str, cause: Box<MapError> },
    #[error("{}: {action} failed: {cause}", path.display())]
    Io { path: PathBuf, action: &'static str, cause: std::io::Error },
    #[error("{}: pinning failed: {reason}", path.display())]
    Pin { path: PathBuf, reason: String },
}

/// The loaded object, and the program set that is attached now.
pub struct Loaded {
    pub ebpf: Ebpf,
    /// A program of the attached set (this load's, or the previous run's when it was kept):
    /// `--log` reads that set's log buffer.
    pub attached_program: u32,
    /// The previous run's programs were identical and stay attached.
    pub kept: bool,
}

pub fn install(dir: &Path, cgroup: &Cgroup, plan: &MapPlan) -> Result<Loaded, AttachError> {
    let lock = File::open(dir).map_err(|cause| AttachError::Io { path: dir.into(), action: "opening", cause })?;
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, errno)| AttachError::Io {
        path: dir.into(),
        action: "locking",
        cause: errno.into(),
    })?;
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
        .map_err(|cause| AttachError::Load { dir: dir.into(), cause: cause.into() })?;
    for hook in Hook::needed(plan) {
        load(&mut ebpf, hook)?;
    }
    write_config(&mut ebpf, plan)?;

    if let Some(attached_program) = same_programs_attached(&ebpf, dir, plan) {
        // Same code attached already: the new configuration is in the maps, nothing else to do.
        return Ok(Loaded { ebpf, attached_program, kept: true });
    }
    for hook in Hook::needed(plan) {
        attach(&mut ebpf, hook, cgroup, dir)?;
    }
    // Links of hooks this configuration does not use (sk_lookup without inbound capture, or
    // a program an older mesh-init attached): removing the pin detaches them.
    let wanted: BTreeSet<&str> = Hook::needed(plan).map(|h| program(h).1).collect();
    for entry in
        std::fs::read_dir(dir).map_err(|cause| AttachError::Io { path: dir.into(), action: "listing", cause })?
    {
        let name = entry.map_err(|cause| AttachError::Io { path: dir.into(), action: "listing", cause })?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(LINK_PREFIX) && !wanted.contains(name.as_ref()) {
            remove_file(&dir.join(name.as_ref()))?;
        }
    }
    let attached_program = program_info(&ebpf, program(Hook::Connect4).0)?.id();
    Ok(Loaded { ebpf, attached_program, kept: false })
}

/// Loads (verifies) the program of `hook`.
fn load(ebpf: &mut Ebpf, hook: Hook) -> Result<(), AttachError> {
    if hook.refused() {
        return Err(hook.missing().into());
    }
    let (name, _) = program(hook);
    let err = |cause: ProgramError| AttachError::Program { name, action: "loading (verifier)", cause: cause.into() };
    match hook {
        Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 => {
            typed::<CgroupSockAddr>(ebpf, name)?.load().map_err(err)
        }
        Hook::SockCreate => typed::<CgroupSock>(ebpf, name)?.load().map_err(err),
        Hook::SockOps => typed::<SockOps>(ebpf, name)?.load().map_err(err),
        Hook::GetSockopt => typed::<CgroupSockopt>(ebpf, name)?.load().map_err(err),
        Hook::SkLookup => typed::<SkLookup>(ebpf, name)?.load().map_err(err),
    }
}

/// Attaches the (loaded) program of `hook` and pins its link, replacing the pinned one.
fn attach(ebpf: &mut Ebpf, hook: Hook, cgroup: &Cgroup, dir: &Path) -> Result<(), AttachError> {
    let (name, pin) = program(hook);
    let single = CgroupAttachMode::Single;
    macro_rules! attach_fd_link {
        ($ty:ty, $($target:expr),+) => {{
            let prog = typed::<$ty>(ebpf, name)?;
            let id = prog
                .attach($($target),+)
                .map_err(|cause| AttachError::Program { name, action: "attaching", cause: cause.into() })?;
            let link = prog
                .take_link(id)
                .map_err(|cause| AttachError::Program { name, action: "taking the link", cause: cause.into() })?;
            FdLink::try_from(link).map_err(|e| AttachError::Link { name, reason: e.to_string() })?
        }};
    }
    let link = match hook {
        Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 => {
            attach_fd_link!(CgroupSockAddr, &cgroup.file, single)
        }
        Hook::SockCreate => attach_fd_link!(CgroupSock, &cgroup.file, single),
        Hook::SockOps => attach_fd_link!(SockOps, &cgroup.file, single),
        Hook::SkLookup => {
            let netns_path = Path::new("/proc/thread-self/ns/net");
            let netns = File::open(netns_path).map_err(|cause| AttachError::Io {
                path: netns_path.into(),
                action: "opening",
                cause,
            })?;
            attach_fd_link!(SkLookup, &netns)
        }
        Hook::GetSockopt => {
            let prog = typed::<CgroupSockopt>(ebpf, name)?;
            let fd = prog.fd().map_err(|cause| AttachError::Program {
                name,
                action: "getting its fd",
                cause: cause.into(),
            })?;
            let link =
                raw_link::link_create(fd.as_fd(), cgroup.file.as_fd(), raw_link::BPF_CGROUP_GETSOCKOPT).map_err(
                    |cause| AttachError::Io { path: cgroup.path.clone(), action: "attaching getsockopt", cause },
                )?;
            return replace_pin(|path| raw_link::pin(&link, path).map_err(|e| e.to_string()), &dir.join(pin));
        }
    };
    replace_pin(|path| link.pin(path).map(drop).map_err(|e| e.to_string()), &dir.join(pin))
}

fn program_info(ebpf: &Ebpf, name: &'static str) -> Result<ProgramInfo, AttachError> {
    let prog = ebpf.program(name).unwrap_or_else(|| panic!("the object defines program {name}"));
    prog.info().map_err(|cause| AttachError::Program { name, action: "reading its info", cause: Box::new(cause) })
}

/// When exactly the links this configuration needs are pinned and each runs a program with
/// the same tag (a hash of its instructions, map references aside) as the one just loaded, the
/// id of the attached connect4 program: re-attaching would change nothing but the ids.
fn same_programs_attached(ebpf: &Ebpf, dir: &Path, plan: &MapPlan) -> Option<u32> {
    let attached: Vec<ProgramInfo> = loaded_programs().filter_map(Result::ok).collect();
    let mut connect4 = None;
    for hook in Hook::ALL {
        let (name, pin) = program(hook);
        let path = dir.join(pin);
        if !Hook::needed(plan).any(|h| h == hook) {
            if path.exists() {
                return None;
            }
            continue;
        }
        let link = FdLink::from(PinnedLink::from_pin(&path).ok()?);
        if hook == Hook::SkLookup
            && raw_link::netns_of_link(raw_link::open_pinned(&path).ok()?.as_fd()).ok()? != current_netns()?
        {
            // Attached to another network namespace: this run's must be attached anew.
            return None;
        }
        let prog_id = link.info().ok()?.program_id();
        let old = attached.iter().find(|p| p.id() == prog_id)?;
        let new = ebpf.program(name)?.info().ok()?;
        if old.tag() != new.tag() {
            return None;
        }
        if hook == Hook::Connect4 {
            connect4 = Some(prog_id);
        }
    }
    connect4
}

fn current_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net").ok().map(|m| m.ino())
}

/// Writes the end of the `--log` lease (CLOCK_MONOTONIC nanoseconds, 0 for none).
pub fn set_log_lease(ebpf: &mut Ebpf, until_ns: u64) -> Result<(), AttachError> {
    let name = names::CONTROL;
    let err = |action| move |cause: MapError| AttachError::Map { name, action, cause: cause.into() };
    let mut control: Array<_, u64> = Array::try_from(map_mut(ebpf, name)).map_err(err("opening"))?;
    control.set(CONTROL_LOG_UNTIL, until_ns, 0).map_err(err("writing"))
}

fn typed<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttachError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf.program_mut(name).unwrap_or_else(|| panic!("the object defines program {name}"));
    prog.try_into().map_err(|cause| AttachError::Program { name, action: "typing", cause: Box::new(cause) })
}

/// Pins a link at `path` with `pin`, replacing (and so detaching) whatever link was pinned there:
/// pinned beside it first, then renamed over it, so the hook is never left empty.
fn replace_pin(pin: impl FnOnce(&Path) -> Result<(), String>, path: &Path) -> Result<(), AttachError> {
    // bpffs refuses names with a '.', hence "-new".
    let mut fresh = path.as_os_str().to_owned();
    fresh.push("-new");
    let fresh = PathBuf::from(fresh);
    remove_file(&fresh)?;
    pin(&fresh).map_err(|reason| AttachError::Pin { path: fresh.clone(), reason })?;
    std::fs::rename(&fresh, path).map_err(|cause| AttachError::Io {
        path: path.into(),
        action: "renaming the new link over the old",
        cause,
    })
}

fn remove_file(path: &Path) -> Result<(), AttachError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(AttachError::Io { path: path.into(), action: "removing", cause: e })
        }
        _ => Ok(()),
    }
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> &'a mut aya::maps::Map {
    ebpf.map_mut(name).unwrap_or_else(|| panic!("the object defines map {name}"))
}

/// Writes the plan into the inactive generation of the (possibly live, reused) maps, then
/// makes it the active one.
fn write_config(ebpf: &mut Ebpf, plan: &MapPlan) -> Result<(), AttachError> {
    let err = |name, action| move |cause: MapError| AttachError::Map { name, action, cause: cause.into() };
    let name = names::CONTROL;
    let active = Array::<_, u64>::try_from(map_mut(ebpf, name))
        .map_err(err(name, "opening"))?
        .get(&CONTROL_GENERATION, 0)
        .map_err(err(name, "reading"))? as u32
        & (GENERATIONS - 1);
    let next = (active + 1) % GENERATIONS;

    for (name, ids) in [(names::PROXY_UIDS, &plan.proxy_uids), (names::PROXY_GIDS, &plan.proxy_gids)] {
        let mut map: HashMap<_, u64, u8> = HashMap::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
        let stale: Vec<u64> = map.keys().filter_map(Result::ok).filter(|k| (k >> 32) as u32 == next).collect();
        for key in stale {
            map.remove(&key).map_err(err(name, "removing"))?;
        }
        for id in ids {
            map.insert(id_key(next, *id), 1, 0).map_err(err(name, "inserting"))?;
        }
    }

    for (name, cidrs) in [(names::INCLUDE_CIDRS, &plan.include_cidrs), (names::EXCLUDE_CIDRS, &plan.exclude_cidrs)] {
        let mut trie: LpmTrie<_, CidrKey, u8> = LpmTrie::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
        let stale: Vec<Key<CidrKey>> = trie.keys().filter_map(Result::ok).filter(|k| k.data()[0] == next).collect();
        for key in stale {
            trie.remove(&key).map_err(err(name, "removing"))?;
        }
        for (len, addr) in cidrs {
            trie.insert(&Key::new(32 + len, cidr_key(next, addr)), 1, 0).map_err(err(name, "inserting"))?;
        }
    }

    let name = names::PORT_SETS;
    let mut ports: Array<_, u64> = Array::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
    let base = next * PORT_SETS_PER_GENERATION * PORT_SET_WORDS;
    for (i, want) in plan.port_sets.iter().enumerate() {
        let i = base + i as u32;
        if ports.get(&i, 0).map_err(err(name, "reading"))? != *want {
            ports.set(i, want, 0).map_err(err(name, "writing"))?;
        }
    }

    let name = names::SETTINGS;
    let mut settings: Array<_, Config> = Array::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
    settings.set(next, plan.config, 0).map_err(err(name, "writing"))?;

    // The switch: one 8-byte element.
    let name = names::CONTROL;
    let mut control: Array<_, u64> = Array::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
    control.set(CONTROL_GENERATION, u64::from(next), 0).map_err(err(name, "switching"))
}

/// Removes a cgroup's pins: links first (which detaches the programs), then maps. Returns the
/// directory if it existed.
pub fn cleanup(dir: &Path) -> Result<Vec<PathBuf>, AttachError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(cause) => return Err(AttachError::Io { path: dir.into(), action: "listing", cause }),
    };
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    // "link-*" sorts before the upper-case map names only by accident; be explicit.
    files.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(LINK_PREFIX)));
    for file in files {
        remove_file(&file)?;
    }
    std::fs::remove_dir(dir).map_err(|cause| AttachError::Io { path: dir.into(), action: "removing", cause })?;
    // The top directory goes with its last cgroup; other cgroups' directories keep it.
    if let Some(top) = dir.parent() {
        let _ = std::fs::remove_dir(top);
    }
    Ok(vec![dir.to_path_buf()])
}

/// `--cleanup-only` without `--cgroup`: every cgroup's pins, then mesh-init's top directory.
pub fn cleanup_all(bpffs: &Bpffs) -> Result<Vec<PathBuf>, AttachError> {
    let dirs = bpffs.cgroup_dirs().map_err(|e| AttachError::Io {
        path: bpffs.root.clone(),
        action: "listing",
        cause: std::io::Error::other(e.to_string()),
    })?;
    let mut removed = Vec::new();
    for (_, dir) in dirs {
        removed.extend(cleanup(&dir)?);
    }
    let top = bpffs.root.join(super::pins::TOP);
    match std::fs::remove_dir(&top) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(AttachError::Io { path: top, action: "removing", cause: e })
        }
        _ => {}
    }
    Ok(removed)
}

//! Loading, configuring, attaching and pinning; and removing it all again.
//!
//! Re-running with the same binary changes only the configuration maps: the programs are
//! loaded (and verified) again, and when each pinned link already runs a program with the same
//! tag, the new ones are dropped and nothing is re-attached. Otherwise (an upgrade, or inbound
//! capture turned on or off), re-attaching is make-before-break: the maps are reused from their pins (so entries of
//! connections in flight survive and the new programs see the same state), the new config is
//! written add-then-remove (no moment where the proxy's UID is missing from its map), each new
//! link is pinned beside the old one and renamed over it. Until the rename both programs are
//! attached; they compute the same answers from the same maps, and a connect already rewritten
//! to loopback is left alone by the second. The rename drops the last reference to the old link,
//! which detaches it.

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, MapData, MapError, SockHash},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs, CgroupAttachMode, CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError, ProgramInfo,
        SkLookup, SkMsg, SockOps,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use mesh_ebpf_common::{maps as names, Addr, Config, SockPair, CFG_LOG};

use super::{cgroup::Cgroup, pins::Bpffs, plan::MapPlan, raw_link};

/// The object `mesh-init/build.rs` built from the `mesh-ebpf` crate.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

/// Pinned link names, one per program (`sk_msg` is attached to its map, not linked).
pub const LINKS: [(&str, &str); 6] = [
    ("link-connect4", "connect4"),
    ("link-connect6", "connect6"),
    ("link-sock-release", "sock_release"),
    ("link-sock-ops", "sock_ops"),
    (GETSOCKOPT_LINK, "getsockopt"),
    (SK_LOOKUP_LINK, "steer_inbound"),
];
const GETSOCKOPT_LINK: &str = "link-getsockopt";
const SK_LOOKUP_LINK: &str = "link-sk-lookup";

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("loading the eBPF object with maps pinned in {} failed: {cause}. If mesh-init was upgraded and a \
             map changed shape, remove the old pins with `mesh-init ebpf --cleanup-only --cgroup ...`", dir.display())]
    Load { dir: PathBuf, cause: Box<EbpfError> },
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

pub fn install(dir: &Path, cgroup: &Cgroup, plan: &MapPlan, log: bool) -> Result<Loaded, AttachError> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(OBJECT)
        .map_err(|cause| AttachError::Load { dir: dir.into(), cause: cause.into() })?;
    write_config(&mut ebpf, plan, log)?;

    macro_rules! load {
        ($ty:ty, $name:literal) => {{
            let prog: &mut $ty = program(&mut ebpf, $name)?;
            prog.load().map_err(|cause| AttachError::Program {
                name: $name,
                action: "loading (verifier)",
                cause: cause.into(),
            })?;
        }};
    }
    load!(CgroupSockAddr, "connect4");
    load!(CgroupSockAddr, "connect6");
    load!(CgroupSock, "sock_release");
    load!(SockOps, "sock_ops");
    load!(CgroupSockopt, "getsockopt");
    load!(SkLookup, "steer_inbound");
    load!(SkMsg, "redirect_local");

    if let Some(attached_program) = same_programs_attached(&ebpf, dir, plan.inbound) {
        // Same code attached already: the new configuration is in the maps, nothing else to do.
        return Ok(Loaded { ebpf, attached_program, kept: true });
    }

    macro_rules! attach {
        ($ty:ty, $name:literal, $($target:expr),+) => {{
            let prog: &mut $ty = program(&mut ebpf, $name)?;
            let id = prog
                .attach($($target),+)
                .map_err(|cause| AttachError::Program { name: $name, action: "attaching", cause: cause.into() })?;
            let link = prog
                .take_link(id)
                .map_err(|cause| AttachError::Program { name: $name, action: "taking the link", cause: cause.into() })?;
            FdLink::try_from(link).map_err(|e| AttachError::Link { name: $name, reason: e.to_string() })?
        }};
    }
    let single = CgroupAttachMode::Single;
    let links = [
        attach!(CgroupSockAddr, "connect4", &cgroup.file, single),
        attach!(CgroupSockAddr, "connect6", &cgroup.file, single),
        attach!(CgroupSock, "sock_release", &cgroup.file, single),
        attach!(SockOps, "sock_ops", &cgroup.file, single),
    ];
    for ((pin, _), link) in LINKS.iter().zip(links) {
        replace_pin(|path| link.pin(path).map(drop).map_err(|e| e.to_string()), &dir.join(pin))?;
    }
    {
        let prog: &mut CgroupSockopt = program(&mut ebpf, "getsockopt")?;
        let fd = prog.fd().map_err(|cause| AttachError::Program {
            name: "getsockopt",
            action: "getting its fd",
            cause: cause.into(),
        })?;
        let link = raw_link::link_create(fd.as_fd(), cgroup.file.as_fd(), raw_link::BPF_CGROUP_GETSOCKOPT)
            .map_err(|cause| AttachError::Io { path: cgroup.path.clone(), action: "attaching getsockopt", cause })?;
        replace_pin(|path| raw_link::pin(&link, path).map_err(|e| e.to_string()), &dir.join(GETSOCKOPT_LINK))?;
    }
    if plan.inbound {
        let netns_path = Path::new("/proc/thread-self/ns/net");
        let netns = File::open(netns_path).map_err(|cause| AttachError::Io {
            path: netns_path.into(),
            action: "opening",
            cause,
        })?;
        let link = attach!(SkLookup, "steer_inbound", &netns);
        replace_pin(|path| link.pin(path).map(drop).map_err(|e| e.to_string()), &dir.join(SK_LOOKUP_LINK))?;
    } else {
        remove_file(&dir.join(SK_LOOKUP_LINK))?;
    }

    // sk_msg is attached to the sockhash, which keeps it for as long as the map lives (the map
    // is pinned); a re-run's attach replaces the previous program. It only ever runs for
    // sockets `sock_ops` put in the map, which it does only with --accelerate.
    let sockhash = ebpf.map(names::LOCAL_SOCKS).expect("the object defines LOCAL_SOCKS");
    let sockhash: SockHash<&MapData, SockPair> = SockHash::try_from(sockhash).map_err(|cause| AttachError::Map {
        name: names::LOCAL_SOCKS,
        action: "opening",
        cause: cause.into(),
    })?;
    let fd = sockhash.fd().try_clone().map_err(|cause| AttachError::Io {
        path: dir.join(names::LOCAL_SOCKS),
        action: "duplicating",
        cause,
    })?;
    let prog: &mut SkMsg = program(&mut ebpf, "redirect_local")?;
    let id = prog.attach(&fd).map_err(|cause| AttachError::Program {
        name: "redirect_local",
        action: "attaching",
        cause: cause.into(),
    })?;
    let link = prog.take_link(id).map_err(|cause| AttachError::Program {
        name: "redirect_local",
        action: "taking the link",
        cause: cause.into(),
    })?;
    // Dropping this link would detach the program from the map: the attachment must outlive us.
    std::mem::forget(link);

    let attached_program = program_info(&ebpf, "connect4")?.id();
    Ok(Loaded { ebpf, attached_program, kept: false })
}

fn program_info(ebpf: &Ebpf, name: &'static str) -> Result<ProgramInfo, AttachError> {
    let prog = ebpf.program(name).unwrap_or_else(|| panic!("the object defines program {name}"));
    prog.info().map_err(|cause| AttachError::Program { name, action: "reading its info", cause: Box::new(cause) })
}

/// When every link this configuration needs is pinned and runs a program with the same tag (a
/// hash of its instructions, map references aside) as the one just loaded, the id of the
/// attached connect4 program: re-attaching would change nothing but the ids.
fn same_programs_attached(ebpf: &Ebpf, dir: &Path, inbound: bool) -> Option<u32> {
    let attached: Vec<ProgramInfo> = loaded_programs().filter_map(Result::ok).collect();
    let mut connect4 = None;
    for (pin, name) in LINKS {
        let path = dir.join(pin);
        if pin == SK_LOOKUP_LINK && !inbound {
            if path.exists() {
                return None;
            }
            continue;
        }
        let link = FdLink::from(PinnedLink::from_pin(&path).ok()?);
        if pin == SK_LOOKUP_LINK
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
        if name == "connect4" {
            connect4 = Some(prog_id);
        }
    }
    connect4
}

fn current_netns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/thread-self/ns/net").ok().map(|m| m.ino())
}

/// Switches the programs' debug records on or off (`CFG_LOG`), without a reload.
pub fn set_log(ebpf: &mut Ebpf, on: bool) -> Result<(), AttachError> {
    let name = names::CONFIG;
    let err = |action| move |cause: MapError| AttachError::Map { name, action, cause: cause.into() };
    let mut config: Array<_, Config> = Array::try_from(map_mut(ebpf, name)).map_err(err("opening"))?;
    let mut c = config.get(&0, 0).map_err(err("reading"))?;
    c.flags = if on { c.flags | CFG_LOG } else { c.flags & !CFG_LOG };
    config.set(0, c, 0).map_err(err("writing"))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, AttachError>
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

/// Writes the plan into the (possibly live, reused) maps: additions before removals.
fn write_config(ebpf: &mut Ebpf, plan: &MapPlan, log: bool) -> Result<(), AttachError> {
    let err = |name, action| move |cause: MapError| AttachError::Map { name, action, cause: cause.into() };

    for (name, ids) in [(names::PROXY_UIDS, &plan.proxy_uids), (names::PROXY_GIDS, &plan.proxy_gids)] {
        let mut map: HashMap<_, u32, u8> = HashMap::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
        for id in ids {
            map.insert(id, 1, 0).map_err(err(name, "inserting"))?;
        }
        let stale: Vec<u32> = map.keys().filter_map(Result::ok).filter(|k| !ids.contains(k)).collect();
        for id in stale {
            map.remove(&id).map_err(err(name, "removing"))?;
        }
    }

    for (name, cidrs) in [(names::INCLUDE_CIDRS, &plan.include_cidrs), (names::EXCLUDE_CIDRS, &plan.exclude_cidrs)] {
        let mut trie: LpmTrie<_, Addr, u8> = LpmTrie::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
        let wanted: BTreeSet<(u32, Addr)> = cidrs.iter().copied().collect();
        for (len, addr) in &wanted {
            trie.insert(&Key::new(*len, *addr), 1, 0).map_err(err(name, "inserting"))?;
        }
        let stale: Vec<Key<Addr>> =
            trie.keys().filter_map(Result::ok).filter(|k| !wanted.contains(&(k.prefix_len(), k.data()))).collect();
        for key in stale {
            trie.remove(&key).map_err(err(name, "removing"))?;
        }
    }

    let name = names::PORT_SETS;
    let mut ports: Array<_, u64> = Array::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
    for (i, want) in plan.port_sets.iter().enumerate() {
        let i = i as u32;
        if ports.get(&i, 0).map_err(err(name, "reading"))? != *want {
            ports.set(i, want, 0).map_err(err(name, "writing"))?;
        }
    }

    // Last: the programs act on nothing until CONFIG is set.
    let name = names::CONFIG;
    let mut config: Array<_, Config> = Array::try_from(map_mut(ebpf, name)).map_err(err(name, "opening"))?;
    let mut value = plan.config;
    if log {
        value.flags |= CFG_LOG;
    }
    config.set(0, value, 0).map_err(err(name, "writing"))?;
    Ok(())
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
    files.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link-")));
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

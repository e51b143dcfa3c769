//! `mesh-init status`, eBPF part: per cgroup, the pinned links (and so the attached programs),
//! the configuration, the number of entries in each map, and the programs' event counters.

use std::{io::Write, path::Path};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, SockHash},
    programs::{links::{FdLink, PinnedLink}, loaded_programs},
};
use mesh_ebpf_common::{maps as names, Addr, Config, OrigDst, SockPair, COUNTER_NAMES};

use super::{attach::LINKS, cgroup, pins::Bpffs, Error};

pub fn write(out: &mut dyn Write) -> Result<(), Error> {
    let mut any = false;
    let cgroup_root = cgroup::cgroup2_mounts()?.into_iter().next();
    for bpffs in Bpffs::mounted()? {
        for (name, dir) in bpffs.cgroup_dirs()? {
            any = true;
            let relative = cgroup::cgroup_of_pin_name(&name);
            let path = cgroup_root.as_ref().map(|r| r.join(&relative));
            match &path {
                Some(p) if p.is_dir() => writeln!(out, "ebpf: cgroup {} (pins in {})", p.display(), dir.display())?,
                Some(p) => writeln!(out, "ebpf: cgroup {} (removed; pins in {})", p.display(), dir.display())?,
                None => writeln!(out, "ebpf: cgroup {relative} (pins in {})", dir.display())?,
            }
            write_links(out, &dir)?;
            write_maps(out, &dir)?;
        }
    }
    if !any {
        writeln!(out, "ebpf: nothing installed")?;
    }
    Ok(())
}

fn write_links(out: &mut dyn Write, dir: &Path) -> Result<(), Error> {
    for (pin, program) in LINKS {
        let path = dir.join(pin);
        if !path.exists() {
            writeln!(out, "  {program}: not attached")?;
            continue;
        }
        let described = PinnedLink::from_pin(&path).map(FdLink::from).and_then(|l| l.info());
        match described {
            Ok(info) => {
                let prog = loaded_programs()
                    .filter_map(Result::ok)
                    .find(|p| p.id() == info.program_id())
                    .and_then(|p| p.name_as_str().map(str::to_owned))
                    .unwrap_or_else(|| "?".into());
                writeln!(out, "  {program}: attached (link {}, program {} {prog})", info.id(), info.program_id())?
            }
            Err(e) => writeln!(out, "  {program}: pinned at {} but unreadable: {e}", path.display())?,
        }
    }
    Ok(())
}

fn write_maps(out: &mut dyn Write, dir: &Path) -> Result<(), Error> {
    let open = |name: &str| MapData::from_pin(dir.join(name)).ok();
    if let Some(Ok(config)) = open(names::CONFIG).map(|m| Array::<_, Config>::try_from(Map::Array(m))) {
        if let Ok(c) = config.get(&0, 0) {
            writeln!(out, "  config: outbound port {}, inbound port {}, flags {:#x}", c.outbound_port, c.inbound_port, c.flags)?;
        }
    }
    let mut counts = Vec::new();
    let mut count = |name: &'static str, n: Option<usize>| counts.push(format!("{name} {}", n.map_or("?".into(), |n| n.to_string())));
    count(names::PROXY_UIDS, open(names::PROXY_UIDS).and_then(|m| HashMap::<_, u32, u8>::try_from(Map::HashMap(m)).ok()).map(|m| m.keys().count()));
    count(names::PROXY_GIDS, open(names::PROXY_GIDS).and_then(|m| HashMap::<_, u32, u8>::try_from(Map::HashMap(m)).ok()).map(|m| m.keys().count()));
    count(names::INCLUDE_CIDRS, open(names::INCLUDE_CIDRS).and_then(|m| LpmTrie::<_, Addr, u8>::try_from(Map::LpmTrie(m)).ok()).map(|m| m.keys().count()));
    count(names::EXCLUDE_CIDRS, open(names::EXCLUDE_CIDRS).and_then(|m| LpmTrie::<_, Addr, u8>::try_from(Map::LpmTrie(m)).ok()).map(|m| m.keys().count()));
    count(names::ORIG_BY_COOKIE, open(names::ORIG_BY_COOKIE).and_then(|m| HashMap::<_, u64, OrigDst>::try_from(Map::LruHashMap(m)).ok()).map(|m| m.keys().count()));
    count(names::ORIG_BY_PAIR, open(names::ORIG_BY_PAIR).and_then(|m| HashMap::<_, SockPair, OrigDst>::try_from(Map::LruHashMap(m)).ok()).map(|m| m.keys().count()));
    count(names::LOCAL_SOCKS, open(names::LOCAL_SOCKS).and_then(|m| SockHash::<_, SockPair>::try_from(Map::SockHash(m)).ok()).map(|m| m.keys().count()));
    writeln!(out, "  map entries: {}", counts.join(", "))?;
    if let Some(Ok(counters)) = open(names::COUNTERS).map(|m| PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(m))) {
        let shown: Vec<String> = COUNTER_NAMES
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let total: u64 = counters.get(&(i as u32), 0).map(|v| v.iter().sum()).unwrap_or(0);
                format!("{name} {total}")
            })
            .collect();
        writeln!(out, "  counters: {}", shown.join(", "))?;
    }
    Ok(())
}

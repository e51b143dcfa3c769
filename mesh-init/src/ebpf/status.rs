//! `mesh-init status`, eBPF part: per cgroup, the pinned links (and so the attached programs),
//! the active generation's configuration, the entries of the connection map against its bound,
//! and the programs' event counters.

use std::{io::Write, path::Path};

use aya::{
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use mesh_ebpf_common::{
    maps as names, Addr, CidrKey, Config, OrigDst, PortSet, SockPair, CFG_INBOUND, CFG_INBOUND_FAIL_OPEN,
    CFG_INCLUDE_ALL_CIDRS, CFG_INCLUDE_ALL_INBOUND_PORTS, CONTROL_GENERATION, CONTROL_LOG_UNTIL, COUNTER_NAMES,
    GENERATIONS, PAIR_ENTRIES, PORT_SET_WORDS,
};

use super::{attach::program, cgroup, log::monotonic_ns, pins::Bpffs, probe::Hook, Error};

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
    for hook in Hook::ALL {
        let (program, pin) = program(hook);
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
    let control = open(names::CONTROL).and_then(|m| Array::<_, u64>::try_from(Map::Array(m)).ok());
    let read = |i: u32| control.as_ref().and_then(|c| c.get(&i, 0).ok()).unwrap_or(0);
    let generation = read(CONTROL_GENERATION) as u32 & (GENERATIONS - 1);
    let logging = read(CONTROL_LOG_UNTIL) > monotonic_ns();
    let mut flags = 0;
    if let Some(Ok(settings)) = open(names::SETTINGS).map(|m| Array::<_, Config>::try_from(Map::Array(m))) {
        if let Ok(c) = settings.get(&generation, 0) {
            flags = c.flags;
            let mut named: Vec<&str> = [(CFG_INBOUND, "inbound"), (CFG_INBOUND_FAIL_OPEN, "inbound fail-open")]
                .iter()
                .filter(|(bit, _)| c.flags & bit != 0)
                .map(|(_, name)| *name)
                .collect();
            if logging {
                named.push("log");
            }
            writeln!(
                out,
                "  config: outbound port {}, inbound port {}, [{}]",
                c.outbound_port,
                c.inbound_port,
                named.join(", ")
            )?;
        }
    }
    let ids = |name: &str| -> String {
        let mut ids: Vec<u32> = open(name)
            .and_then(|m| HashMap::<_, u64, u8>::try_from(Map::HashMap(m)).ok())
            .map(|m| {
                m.keys().filter_map(Result::ok).filter(|k| (k >> 32) as u32 == generation).map(|k| k as u32).collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
    };
    writeln!(out, "  proxy uids: {}, gids: {}", ids(names::PROXY_UIDS), ids(names::PROXY_GIDS))?;
    let cidrs = |name: &str| -> String {
        let mut nets: Vec<String> = open(name)
            .and_then(|m| LpmTrie::<_, CidrKey, u8>::try_from(Map::LpmTrie(m)).ok())
            .map(|t| {
                t.keys()
                    .filter_map(Result::ok)
                    .filter(|k| k.data()[0] == generation)
                    .map(|k| {
                        let d = k.data();
                        show_cidr(k.prefix_len() - 32, &[d[1], d[2], d[3], d[4]])
                    })
                    .collect()
            })
            .unwrap_or_default();
        nets.sort();
        nets.join(",")
    };
    let include = if flags & CFG_INCLUDE_ALL_CIDRS != 0 { "*".to_string() } else { cidrs(names::INCLUDE_CIDRS) };
    writeln!(out, "  outbound cidrs: include {include:?}, exclude {:?}", cidrs(names::EXCLUDE_CIDRS))?;
    let words: Vec<u64> = open(names::PORT_SETS)
        .and_then(|m| Array::<_, u64>::try_from(Map::Array(m)).ok())
        .map(|a| a.iter().filter_map(Result::ok).collect())
        .unwrap_or_default();
    let ports = |set: PortSet| show_ports(&words, generation, set);
    let inbound =
        if flags & CFG_INCLUDE_ALL_INBOUND_PORTS != 0 { "*".to_string() } else { ports(PortSet::IncludeInbound) };
    writeln!(
        out,
        "  ports: outbound include {:?} exclude {:?}, inbound include {inbound:?} exclude {:?}",
        ports(PortSet::IncludeOutbound),
        ports(PortSet::ExcludeOutbound),
        ports(PortSet::ExcludeInbound)
    )?;
    let pairs = open(names::ORIG_BY_PAIR)
        .and_then(|m| HashMap::<_, SockPair, OrigDst>::try_from(Map::HashMap(m)).ok())
        .map_or("?".to_string(), |m| m.keys().count().to_string());
    writeln!(out, "  map entries: {} {pairs} (bound {PAIR_ENTRIES})", names::ORIG_BY_PAIR)?;
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

/// An LPM key back as a CIDR (IPv4-mapped keys as IPv4).
fn show_cidr(len: u32, addr: &Addr) -> String {
    let mut o = [0u8; 16];
    for (i, w) in addr.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => format!("{v4}/{}", len - 96),
        _ => format!("{v6}/{len}"),
    }
}

/// The ports of one bitmap of `generation`, with runs shown as ranges (`8000-8002,22`).
fn show_ports(words: &[u64], generation: u32, set: PortSet) -> String {
    let has = |p: u32| {
        let (index, bit) = set.slot(generation, p as u16);
        words.get(index as usize).is_some_and(|w| w & bit != 0)
    };
    let mut runs: Vec<String> = Vec::new();
    let mut p = 0u32;
    while p < PORT_SET_WORDS * 64 {
        if has(p) {
            let start = p;
            while p + 1 < PORT_SET_WORDS * 64 && has(p + 1) {
                p += 1;
            }
            runs.push(if start == p { start.to_string() } else { format!("{start}-{p}") });
        }
        p += 1;
    }
    runs.join(",")
}

//! What the configuration maps must hold for a [`CaptureConfig`]: plain data, built and checked
//! (by `ebpf_limits`) before anything is loaded, so a flag this mode cannot honour is refused
//! with nothing changed.

use std::net::IpAddr;

use ipnet::IpNet;
use mesh_ebpf_common::{
    mapped_v4, Addr, Config, PortSet, CFG_HAS_INCLUDE_OUTBOUND_PORTS, CFG_INBOUND, CFG_INBOUND_FAIL_OPEN,
    CFG_INCLUDE_ALL_CIDRS, CFG_INCLUDE_ALL_INBOUND_PORTS, PORT_SETS_PER_GENERATION, PORT_SET_WORDS,
};

use crate::{
    capture::{CaptureConfig, Selection},
    ebpf_limits::Unsupported,
};

/// The contents of one generation of every configuration map (the loader writes it into the
/// inactive generation, then switches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPlan {
    /// The generation's element of `SETTINGS`.
    pub config: Config,
    /// Whether inbound steering is on (`--istio-inbound-ports` not empty): then `sk_lookup` is
    /// attached to the current network namespace.
    pub inbound: bool,
    pub proxy_uids: Vec<u32>,
    pub proxy_gids: Vec<u32>,
    /// LPM keys: prefix length over the 128-bit common form, and the address.
    pub include_cidrs: Vec<(u32, Addr)>,
    pub exclude_cidrs: Vec<(u32, Addr)>,
    /// The generation's part of `PORT_SETS`, every element, indexed as generation 0's.
    pub port_sets: Vec<u64>,
}

impl MapPlan {
    /// `inbound_fail_open`: `--inbound-fail-open`, see `CFG_INBOUND_FAIL_OPEN`.
    pub fn new(c: &CaptureConfig, inbound_fail_open: bool) -> Result<Self, Unsupported> {
        crate::ebpf_limits::check(c)?;
        let cidrs = |nets: &mut dyn Iterator<Item = &IpNet>| nets.map(lpm_key).collect::<Vec<_>>();

        let mut flags = 0;
        let include_cidrs = match &c.include_cidrs {
            Selection::All => {
                flags |= CFG_INCLUDE_ALL_CIDRS;
                Vec::new()
            }
            Selection::Only(nets) => cidrs(&mut nets.iter()),
        };
        let exclude_cidrs = cidrs(&mut c.exclude_cidrs.iter());
        let mut port_sets = vec![0u64; (PORT_SETS_PER_GENERATION * PORT_SET_WORDS) as usize];
        let mut add = |set: PortSet, ports: &mut dyn Iterator<Item = &u16>| {
            for &p in ports {
                let (index, bit) = set.slot(0, p);
                port_sets[index as usize] |= bit;
            }
        };
        if !c.include_outbound_ports.is_empty() {
            flags |= CFG_HAS_INCLUDE_OUTBOUND_PORTS;
        }
        add(PortSet::IncludeOutbound, &mut c.include_outbound_ports.iter());
        add(PortSet::ExcludeOutbound, &mut c.exclude_outbound_ports.iter());
        add(PortSet::ExcludeInbound, &mut c.exclude_inbound_ports.iter());
        // istio-iptables returns the tunnel port (`-e`, HBONE) before any inbound redirection:
        // the proxy listens there itself and must see the real destination.
        add(PortSet::ExcludeInbound, &mut [c.tunnel_port].iter());
        let inbound = !c.include_inbound_ports.is_none();
        match &c.include_inbound_ports {
            Selection::All => flags |= CFG_INCLUDE_ALL_INBOUND_PORTS,
            Selection::Only(ports) => add(PortSet::IncludeInbound, &mut ports.iter()),
        }
        if inbound {
            flags |= CFG_INBOUND;
        }
        if inbound_fail_open {
            flags |= CFG_INBOUND_FAIL_OPEN;
        }
        Ok(Self {
            config: Config { outbound_port: c.outbound_port, inbound_port: c.inbound_port, flags },
            inbound,
            proxy_uids: c.proxy_uids.clone(),
            proxy_gids: c.proxy_gids.clone(),
            include_cidrs,
            exclude_cidrs,
            port_sets,
        })
    }
}

/// An address in the maps' common form (see `mesh_ebpf_common`).
pub fn common_addr(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => mapped_v4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]))
        }
    }
}

/// An IPv4 /n is the IPv4-mapped /96+n.
fn lpm_key(net: &IpNet) -> (u32, Addr) {
    let extra = if net.addr().is_ipv4() { 96 } else { 0 };
    (u32::from(net.prefix_len()) + extra, common_addr(net.network()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The reverse of [`common_addr`]; IPv4-mapped addresses come back as IPv4.
    pub fn ip_of(a: &Addr) -> IpAddr {
        let mut o = [0u8; 16];
        for (i, w) in a.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let v6 = std::net::Ipv6Addr::from(o);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }

    fn base() -> CaptureConfig {
        CaptureConfig::capture_all()
    }

    fn has(plan: &MapPlan, set: PortSet, port: u16) -> bool {
        let (i, bit) = set.slot(0, port);
        plan.port_sets[i as usize] & bit != 0
    }

    #[test]
    fn defaults_capture_everything_with_the_ports_given() {
        let p = MapPlan::new(&base(), false).unwrap();
        assert_eq!((p.config.outbound_port, p.config.inbound_port), (15001, 15006));
        assert_eq!(p.config.flags, CFG_INCLUDE_ALL_CIDRS | CFG_INCLUDE_ALL_INBOUND_PORTS | CFG_INBOUND);
        // Only the tunnel port (15008) is set: it is never steered inbound, as in istio-iptables.
        let (index, bit) = PortSet::ExcludeInbound.slot(0, 15008);
        for (i, w) in p.port_sets.iter().enumerate() {
            assert_eq!(*w, if i == index as usize { bit } else { 0 }, "word {i}");
        }
        assert!(p.inbound);
    }

    #[test]
    fn ports_land_in_their_own_bitmap_only() {
        let mut c = base();
        c.exclude_inbound_ports = BTreeSet::from([15020, 15021, 15090, 0xffff]);
        c.exclude_outbound_ports = BTreeSet::from([22, 63, 64]);
        c.include_outbound_ports = BTreeSet::from([1]);
        let p = MapPlan::new(&c, true).unwrap();
        for port in [15020, 15021, 15090, 0xffff] {
            assert!(has(&p, PortSet::ExcludeInbound, port), "{port}");
            assert!(!has(&p, PortSet::ExcludeOutbound, port), "{port}");
        }
        for port in [22, 63, 64] {
            assert!(has(&p, PortSet::ExcludeOutbound, port), "{port}");
        }
        assert!(!has(&p, PortSet::ExcludeOutbound, 65));
        assert!(has(&p, PortSet::IncludeOutbound, 1));
        assert_ne!(p.config.flags & CFG_HAS_INCLUDE_OUTBOUND_PORTS, 0);
        assert_ne!(p.config.flags & CFG_INBOUND_FAIL_OPEN, 0);
    }

    #[test]
    fn empty_inbound_ports_turn_steering_off() {
        let mut c = base();
        c.include_inbound_ports = Selection::Only(BTreeSet::new());
        let p = MapPlan::new(&c, false).unwrap();
        assert!(!p.inbound);
        assert_eq!(p.config.flags & (CFG_INBOUND | CFG_INCLUDE_ALL_INBOUND_PORTS), 0);
    }

    #[test]
    fn cidrs_become_lpm_keys_in_common_form() {
        let mut c = base();
        c.exclude_cidrs = vec!["10.96.0.0/12".parse().unwrap(), "fd00:200::/32".parse().unwrap()];
        c.include_cidrs = Selection::Only(BTreeSet::from(["192.168.1.1/32".parse().unwrap()]));
        let p = MapPlan::new(&c, false).unwrap();
        assert_eq!(p.config.flags & CFG_INCLUDE_ALL_CIDRS, 0);
        let (len, addr) = p.exclude_cidrs[0];
        assert_eq!(len, 96 + 12);
        assert_eq!(ip_of(&addr), "10.96.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(p.exclude_cidrs[1].0, 32);
        assert_eq!(ip_of(&p.exclude_cidrs[1].1), "fd00:200::".parse::<IpAddr>().unwrap());
        // The bytes in memory are the address as written: what the kernel's LPM trie compares.
        let bytes: Vec<u8> = addr.iter().flat_map(|w| w.to_ne_bytes()).collect();
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 0]);
        assert_eq!(p.include_cidrs, vec![(128, common_addr("192.168.1.1".parse().unwrap()))]);
    }
}

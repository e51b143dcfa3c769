//! What the eBPF mode cannot do with a [`CaptureConfig`] that the iptables mode can: the one
//! list, used by `mesh-init ebpf` (before anything is loaded) and by `mesh-init inject --mode
//! ebpf` (so an init container is never given flags it would refuse). Outside the `ebpf`
//! feature on purpose: a build without the eBPF toolchain still injects eBPF-mode pods, and
//! must refuse the same flags.
//!
//! A new capture flag that the eBPF programs cannot honour gets its refusal here, naming the
//! flag and what to use instead.

use mesh_ebpf_common::{MAX_CIDRS, MAX_IDS};

use crate::capture::{CaptureConfig, InboundMode, OwnerGroups, Selection};

/// A capture flag the eBPF mode cannot honour, with what to do instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mesh-init ebpf cannot honour {flag}: {reason}")]
pub struct Unsupported {
    /// The long flag name, as `mesh-init iptables --help` shows it.
    pub flag: &'static str,
    pub reason: String,
}

/// `Ok` when `mesh-init ebpf` can install `c` as the iptables mode would; else the first flag
/// it cannot honour.
pub fn check(c: &CaptureConfig) -> Result<(), Unsupported> {
    if c.inbound_mode == InboundMode::Tproxy {
        return Err(Unsupported {
            flag: "--istio-inbound-interception-mode",
            reason: "TPROXY is a netfilter target; the eBPF mode hands inbound connections to the proxy \
                     unchanged (sk_lookup), which keeps the client's address as TPROXY does: use REDIRECT (the \
                     default) with `mesh-init ebpf`"
                .into(),
        });
    }
    if c.dns.is_some() {
        return Err(Unsupported {
            flag: "--redirect-dns",
            reason: "DNS (UDP) capture is not implemented in the eBPF mode; use `mesh-init iptables`".into(),
        });
    }
    if !c.exclude_interfaces.is_empty() {
        return Err(Unsupported {
            flag: "--istio-exclude-interfaces",
            reason: format!(
                "the connect hook runs before routing and cannot know the interface of {:?}; exclude the \
                 interface's CIDRs with --istio-service-exclude-cidr instead",
                c.exclude_interfaces
            ),
        });
    }
    let unsupported: [(&'static str, bool, &str); 4] = [
        (
            "--kube-virt-interfaces",
            !c.kube_virt_interfaces.is_empty(),
            "traffic arriving from a KubeVirt interface is forwarded, and the connect hook only sees the pod's own sockets",
        ),
        ("--drop-invalid", c.drop_invalid, "dropping INVALID packets needs conntrack; use `mesh-init iptables`"),
        (
            "--outbound-owner-groups",
            c.owner_groups != OwnerGroups::AllExcept(vec![]),
            "the connect hook exempts the proxy's UIDs and GIDs only; use `mesh-init iptables` to capture by group",
        ),
        (
            "--outbound-ipv4-loopback-cidr",
            c.ipv4_loopback.to_string() != "127.0.0.1/32",
            "the programs leave all of 127.0.0.0/8 alone already",
        ),
    ];
    if let Some((flag, _, reason)) = unsupported.into_iter().find(|(_, set, _)| *set) {
        return Err(Unsupported { flag, reason: reason.into() });
    }
    for (flag, ids) in [("--proxy-uid", &c.proxy_uids), ("--proxy-gid", &c.proxy_gids)] {
        if ids.len() > MAX_IDS as usize {
            return Err(Unsupported { flag, reason: format!("at most {MAX_IDS} IDs fit the map, not {}", ids.len()) });
        }
    }
    let included = match &c.include_cidrs {
        Selection::All => 0,
        Selection::Only(nets) => nets.len(),
    };
    for (flag, n) in [("--istio-service-cidr", included), ("--istio-service-exclude-cidr", c.exclude_cidrs.len())] {
        if n > MAX_CIDRS as usize {
            return Err(Unsupported { flag, reason: format!("at most {MAX_CIDRS} CIDRs fit the map, not {n}") });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> CaptureConfig {
        CaptureConfig::capture_all()
    }

    #[test]
    fn the_defaults_are_supported() {
        assert_eq!(check(&base()), Ok(()));
    }

    #[test]
    fn each_refusal_names_its_flag() {
        let mut c = base();
        c.inbound_mode = InboundMode::Tproxy;
        assert_eq!(check(&c).unwrap_err().flag, "--istio-inbound-interception-mode");
        let mut c = base();
        c.dns = Some(crate::capture::DnsCapture { port: 15053, servers: crate::capture::DnsServers::All });
        assert_eq!(check(&c).unwrap_err().flag, "--redirect-dns");
        let mut c = base();
        c.exclude_interfaces = vec!["eth1".into()];
        let e = check(&c).unwrap_err();
        assert_eq!(e.flag, "--istio-exclude-interfaces");
        assert!(e.to_string().contains("eth1"), "{e}");
        let mut c = base();
        c.proxy_gids = (0..=MAX_IDS).collect();
        assert_eq!(check(&c).unwrap_err().flag, "--proxy-gid");
        let mut c = base();
        c.exclude_cidrs =
            (0..=MAX_CIDRS).map(|i| format!("10.{}.{}.0/24", i / 256, i % 256).parse().unwrap()).collect();
        assert_eq!(check(&c).unwrap_err().flag, "--istio-service-exclude-cidr");
        c.exclude_cidrs.pop();
        assert_eq!(check(&c), Ok(()), "exactly the maximum fits");
        type Set = fn(&mut CaptureConfig);
        let refused: [(&str, Set); 4] = [
            ("--kube-virt-interfaces", |c| c.kube_virt_interfaces = vec!["eth1".into()]),
            ("--drop-invalid", |c| c.drop_invalid = true),
            ("--outbound-owner-groups", |c| c.owner_groups = OwnerGroups::Only(vec![202])),
            ("--outbound-ipv4-loopback-cidr", |c| c.ipv4_loopback = "127.0.0.0/8".parse().unwrap()),
        ];
        for (flag, set) in refused {
            let mut c = base();
            set(&mut c);
            assert_eq!(check(&c).unwrap_err().flag, flag);
        }
    }
}

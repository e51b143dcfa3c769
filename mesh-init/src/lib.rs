//! mesh-init: makes every TCP connection of a pod pass through its sidecar proxy.
//!
//! The crate is laid out as deciding, then doing:
//! - [`capture`]: the flag set every mode shares (istio-iptables' names) and its validation into
//!   a [`capture::CaptureConfig`];
//! - [`rules`]: the iptables rules that config means, as a typed plan, and its rendering to
//!   `iptables-restore` input;
//! - [`iptables`]: the `mesh-init iptables` run ([`iptables::run`]): applying a plan atomically
//!   (one transaction per IP family), re-runs, cleanup, and the choice between the legacy and
//!   nf_tables backends;
//! - `ebpf` (feature `ebpf`): the same interception with eBPF programs attached to a cgroup;
//! - [`ebpf_limits`]: what the eBPF mode cannot do, for `ebpf` and `inject` alike (no feature
//!   needed);
//! - [`inject`]: adding the init container and the sidecar to Kubernetes workloads;
//! - [`trace`]: `mesh-init trace`, a packet followed through the plan (or the installed rules);
//! - [`route`]: the TPROXY mode's policy route;
//! - [`webhook`]: the same injection as a mutating admission webhook (HTTPS, AdmissionReview v1);
//! - [`validate`]: proving from inside the namespace that interception works;
//! - [`loopback`]: the proxy's IPv6 inbound passthrough source (::6 on `lo`);
//! - [`netns`]: joining a network namespace without `ip netns exec`'s remount of `/sys`;
//! - [`orig_dst`]: reading `SO_ORIGINAL_DST`, shared by validation and the tests.

pub mod capture;
#[cfg(feature = "ebpf")]
pub mod ebpf;
pub mod ebpf_limits;
pub mod inject;
pub mod iptables;
pub mod loopback;
pub mod netns;
pub mod orig_dst;
pub mod route;
pub mod rules;
pub mod trace;
pub mod validate;
pub mod webhook;

/// True when the current network namespace has a global-scope IPv6 address, which is when
/// istio-iptables programs ip6tables without being asked.
pub fn has_global_ipv6() -> bool {
    // Columns: address, ifindex, prefix length, scope, flags, name. Scope 00 is global. `lo` is
    // left out: mesh-init's own ::6 lives there.
    std::fs::read_to_string("/proc/net/if_inet6")
        .map(|t| {
            t.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.get(3) == Some(&"00") && cols.get(5) != Some(&"lo")
            })
        })
        .unwrap_or(false)
}

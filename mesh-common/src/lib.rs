//! Facts that mesh-init, mesh-proxy, the eBPF programs, the tests and the benchmark must agree on,
//! each defined once. A value here is a contract between two programs (the rules mesh-init
//! installs and the proxy that receives what they redirect): changing it in one place changes
//! both sides.
//!
//! - [`INBOUND_PASSTHROUGH_V4`], [`INBOUND_PASSTHROUGH_V6`]: the source the proxy binds towards
//!   the local application, which interception leaves alone.
//! - [`PROXY_UID`], [`PROXY_GID`]: the proxy's user, whose traffic is never captured.
//! - [`ports`]: Istio's well-known sidecar ports and this project's defaults.
//! - [`flags`]: the istio-iptables flags mesh-init accepts, for the tools that call it.
//!
//! `no_std` and without dependencies so that the eBPF side (`mesh-ebpf-common`) can use it.

#![no_std]
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

/// The source address the proxy binds when it hands an inbound connection to the local
/// application over IPv4 (Istio's convention). The capture rules and the eBPF inbound program
/// let it through; without that the hand-off would be redirected back to the proxy, in a loop.
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// [`INBOUND_PASSTHROUGH_V4`] for IPv6. Unlike 127.0.0.6 it is not on `lo` by itself: mesh-init
/// adds it when it captures IPv6.
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// The proxy's UID (Istio's): mesh-init's default `--proxy-uid`, the user the injected sidecar
/// runs as, so the proxy's own connections are never redirected to itself.
pub const PROXY_UID: u32 = 1337;

/// The proxy's GID: mesh-init's default `--proxy-gid` follows `--proxy-uid`, and the sidecar's
/// group is the same number.
pub const PROXY_GID: u32 = PROXY_UID;

/// Ports. Istio's are listed for what they mean to a pod (an injector excludes them from inbound
/// capture); this project's defaults are the values mesh-init and mesh-proxy use when no flag or
/// config says otherwise.
pub mod ports {
    /// Istio's outbound capture port (`istio-iptables -p 15001`).
    pub const ISTIO_OUTBOUND: u16 = 15001;
    /// Istio's inbound capture port (`istio-iptables -z 15006`).
    pub const ISTIO_INBOUND: u16 = 15006;
    /// Istio's HBONE tunnel port.
    pub const ISTIO_TUNNEL: u16 = 15008;
    /// Istio's merged application and proxy metrics, and the health checks it rewrites.
    pub const ISTIO_MERGED_METRICS: u16 = 15020;
    /// Istio's readiness port (`/healthz/ready`).
    pub const ISTIO_READINESS: u16 = 15021;
    /// Istio's DNS capture port.
    pub const ISTIO_DNS: u16 = 15053;
    /// Istio's Envoy Prometheus port.
    pub const ISTIO_PROMETHEUS: u16 = 15090;

    /// mesh-init's default `-p`: the one port the proxy listens on for redirected traffic, in
    /// both directions (`-z` defaults to it).
    pub const PROXY: u16 = 15000;
    /// mesh-init's default `--dns-port` (Istio's).
    pub const DNS: u16 = ISTIO_DNS;
    /// mesh-proxy's admin API port (on 127.0.0.1), and the injector's `--proxy-admin-port`.
    pub const ADMIN: u16 = ISTIO_PROMETHEUS;
    /// The injector's `--proxy-readiness-port`: what the readiness probe targets (Istio's).
    pub const READINESS: u16 = ISTIO_READINESS;
}

/// The istio-iptables flags that mesh-init accepts (`mesh-init iptables`, `ebpf`, `validate`), by
/// the names istio-iptables gives them, for the programs that define or pass them.
pub mod flags {
    /// One flag: its long name (without `--`), its short letter and its environment variable.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Flag {
        /// The long name, without the leading `--`.
        pub long: &'static str,
        /// The short letter, where istio-iptables has one.
        pub short: Option<char>,
        /// The environment variable that sets it (the long name upper-cased, `-` as `_`).
        pub env: &'static str,
    }

    /// `-p`: the outbound redirect port.
    pub const ENVOY_PORT: Flag = Flag { long: "envoy-port", short: Some('p'), env: "ENVOY_PORT" };
    /// `-z`: the inbound redirect port.
    pub const INBOUND_CAPTURE_PORT: Flag =
        Flag { long: "inbound-capture-port", short: Some('z'), env: "INBOUND_CAPTURE_PORT" };
    /// `-u`: UIDs never redirected.
    pub const PROXY_UID: Flag = Flag { long: "proxy-uid", short: Some('u'), env: "PROXY_UID" };
    /// `-g`: GIDs never redirected.
    pub const PROXY_GID: Flag = Flag { long: "proxy-gid", short: Some('g'), env: "PROXY_GID" };
    /// `-i`: outbound CIDRs captured.
    pub const SERVICE_CIDR: Flag = Flag { long: "istio-service-cidr", short: Some('i'), env: "ISTIO_SERVICE_CIDR" };
    /// `-x`: outbound CIDRs never captured.
    pub const SERVICE_EXCLUDE_CIDR: Flag =
        Flag { long: "istio-service-exclude-cidr", short: Some('x'), env: "ISTIO_SERVICE_EXCLUDE_CIDR" };
    /// `-q`: outbound ports captured whatever the CIDR.
    pub const OUTBOUND_PORTS: Flag =
        Flag { long: "istio-outbound-ports", short: Some('q'), env: "ISTIO_OUTBOUND_PORTS" };
    /// `-o`: outbound ports never captured.
    pub const OUTBOUND_PORTS_EXCLUDE: Flag = Flag {
        long: "istio-local-outbound-ports-exclude",
        short: Some('o'),
        env: "ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE",
    };
    /// `-b`: inbound ports captured.
    pub const INBOUND_PORTS: Flag = Flag { long: "istio-inbound-ports", short: Some('b'), env: "ISTIO_INBOUND_PORTS" };
    /// `-d`: inbound ports never captured.
    pub const INBOUND_PORTS_EXCLUDE: Flag =
        Flag { long: "istio-local-exclude-ports", short: Some('d'), env: "ISTIO_LOCAL_EXCLUDE_PORTS" };
    /// `-c`: interfaces never captured.
    pub const EXCLUDE_INTERFACES: Flag =
        Flag { long: "istio-exclude-interfaces", short: Some('c'), env: "ISTIO_EXCLUDE_INTERFACES" };
    /// `-m`: REDIRECT or TPROXY for inbound.
    pub const INBOUND_INTERCEPTION_MODE: Flag =
        Flag { long: "istio-inbound-interception-mode", short: Some('m'), env: "ISTIO_INBOUND_INTERCEPTION_MODE" };
    /// `--redirect-dns`: capture DNS to the proxy.
    pub const REDIRECT_DNS: Flag = Flag { long: "redirect-dns", short: None, env: "REDIRECT_DNS" };
    /// `--dns-port`: where captured DNS goes.
    pub const DNS_PORT: Flag = Flag { long: "dns-port", short: None, env: "DNS_PORT" };
}

//! Facts that mesh-init, mesh-proxy, the eBPF programs, the tests and the benchmark must agree on,
//! each defined once. A value here is a contract between two programs (the rules mesh-init
//! installs and the proxy that receives what they redirect): changing it in one place changes
//! both sides.
//!
//! - [`INBOUND_PASSTHROUGH_V4`], [`INBOUND_PASSTHROUGH_V6`]: the source the proxy binds towards
//!   the local application, which interception leaves alone.
//! - [`PROXY_UID`], [`PROXY_GID`]: the proxy's user, whose traffic is never captured.
//! - [`ports`]: Istio's well-known sidecar ports and this project's defaults.
//! - [`flags`]: the istio-iptables flags that more than one crate names.
//! - [`duration`]: the one grammar of durations (Go's), for every flag and config field.
//!
//! `no_std` and without dependencies so that the eBPF side (`mesh-ebpf-common`) can use it.

#![no_std]
#![forbid(unsafe_code)]

use core::net::{Ipv4Addr, Ipv6Addr};

pub mod duration;

/// The source address the proxy binds when it hands an inbound connection to the local
/// application over IPv4 (Istio's convention). The capture rules and the eBPF inbound program
/// let it through; without that the hand-off would be redirected back to the proxy, in a loop.
pub const INBOUND_PASSTHROUGH_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// [`INBOUND_PASSTHROUGH_V4`] for IPv6. Unlike 127.0.0.6 it is not on `lo` by itself: mesh-init
/// adds it when it captures IPv6.
pub const INBOUND_PASSTHROUGH_V6: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// Defines a number once and, from the same literal, its text (`<NAME>_TEXT`): clap takes a
/// default value as a `&'static str`, and a second literal there would be a second definition.
macro_rules! number_and_text {
    ($($(#[$doc:meta])* $name:ident, $text:ident: $ty:ty = $value:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $name: $ty = $value;
            #[doc = concat!("[`", stringify!($name), "`] as text, for a command line's default value.")]
            pub const $text: &str = stringify!($value);
        )*
    };
}

number_and_text! {
    /// The proxy's UID (Istio's): mesh-init's default `--proxy-uid` (when `ENVOY_USER` names no
    /// user), the user the injected sidecar runs as, so the proxy's own connections are never
    /// redirected to itself.
    PROXY_UID, PROXY_UID_TEXT: u32 = 1337;
}

/// The proxy's GID: mesh-init's default `--proxy-gid` follows `--proxy-uid`, and the sidecar's
/// group is the same number.
pub const PROXY_GID: u32 = PROXY_UID;

/// Ports. Istio's are listed for what they mean to a pod (an injector excludes them from inbound
/// capture, `mesh-init iptables` uses them as istio-iptables does); this project's own defaults
/// are the values mesh-init's other modes and mesh-proxy use when no flag or config says otherwise.
pub mod ports {
    number_and_text! {
        /// Istio's outbound capture port: `mesh-init iptables`' default `-p`.
        ISTIO_OUTBOUND, ISTIO_OUTBOUND_TEXT: u16 = 15001;
        /// Istio's inbound capture port: `mesh-init iptables`' default `-z`.
        ISTIO_INBOUND, ISTIO_INBOUND_TEXT: u16 = 15006;
        /// Istio's HBONE tunnel port: `mesh-init iptables`' default `-e`.
        ISTIO_TUNNEL, ISTIO_TUNNEL_TEXT: u16 = 15008;
        /// Istio's merged application and proxy metrics, and the health checks it rewrites.
        ISTIO_MERGED_METRICS, ISTIO_MERGED_METRICS_TEXT: u16 = 15020;
        /// Istio's readiness port (`/healthz/ready`).
        ISTIO_READINESS, ISTIO_READINESS_TEXT: u16 = 15021;
        /// Istio's DNS capture port: mesh-init's default `--dns-port`.
        ISTIO_DNS, ISTIO_DNS_TEXT: u16 = 15053;
        /// Istio's Envoy Prometheus port.
        ISTIO_PROMETHEUS, ISTIO_PROMETHEUS_TEXT: u16 = 15090;
        /// This project's one proxy port for both directions: the default `-p` of `mesh-init
        /// ebpf` and `mesh-init inject` (`-z` defaults to it), where the sidecar listens.
        PROXY, PROXY_TEXT: u16 = 15000;
    }

    /// mesh-proxy's admin API port (on 127.0.0.1), and the injector's `--proxy-admin-port`:
    /// Istio's Prometheus port, which injectors already exclude from capture.
    pub const ADMIN: u16 = ISTIO_PROMETHEUS;
    /// The injector's `--proxy-readiness-port`: what the readiness probe targets (Istio's).
    pub const READINESS: u16 = ISTIO_READINESS;
}

/// The istio-iptables flags that another crate passes to mesh-init (the bench), defined here and
/// used by mesh-init's own flag definitions; the rest of the set lives in mesh-init's `capture`.
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

    /// `-p`: the outbound redirect port, where the proxy listens.
    pub const ENVOY_PORT: Flag = Flag { long: "envoy-port", short: Some('p'), env: "ENVOY_PORT" };
}

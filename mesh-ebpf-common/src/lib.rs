//! The contract between the mesh-init eBPF programs (`mesh-ebpf`) and the loader in `mesh-init`.
//!
//! Everything here is `#[repr(C)]` and free of implicit padding: the kernel compares hash keys
//! byte by byte, so a padding byte left uninitialised on the eBPF stack would make two equal keys
//! differ. Byte orders are fixed once, here, so neither side has to guess:
//! - addresses are kept as the kernel keeps them, network order, in four `u32` words; an IPv4
//!   address is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type serves both families and an
//!   IPv6 socket talking to an IPv4 peer matches the IPv4 socket on the other end;
//! - ports are host order everywhere in these types (each program converts from its context's
//!   convention, which differs per hook).
//!
//! The configuration is double-buffered: every configuration map holds two generations, the
//! programs read the one `CONTROL[CONTROL_GENERATION]` names, and the loader writes the other
//! one whole before switching with that single 8-byte write. A re-run with new flags therefore
//! changes what is captured at one instant, never through a mix of old and new entries.
#![no_std]

/// `AF_INET` and `AF_INET6` as the kernel numbers them (Linux values on every architecture).
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// `SO_ORIGINAL_DST` (netfilter's `linux/netfilter_ipv4.h`) and `IP6T_SO_ORIGINAL_DST` share the
/// number 80; they differ by level (`SOL_IP` = 0, `SOL_IPV6` = 41).
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// Names of the maps, as the loader finds them in the object and pins them.
pub mod maps {
    /// `Array<u64>`, [`super::CONTROL_ENTRIES`] elements: the active generation, the end of the
    /// `--log` lease. Each is one element so that writing one never rewrites the other.
    pub const CONTROL: &str = "CONTROL";
    /// `Array<Config>`, one element per generation.
    pub const SETTINGS: &str = "SETTINGS";
    /// `HashMap<u64, u8>` keyed by [`super::id_key`]: UIDs whose connections are never
    /// redirected.
    pub const PROXY_UIDS: &str = "PROXY_UIDS";
    /// `HashMap<u64, u8>` keyed by [`super::id_key`]: GIDs whose connections are never
    /// redirected.
    pub const PROXY_GIDS: &str = "PROXY_GIDS";
    /// `LpmTrie<CidrKey, u8>`: outbound destinations captured when not all are.
    pub const INCLUDE_CIDRS: &str = "INCLUDE_CIDRS";
    /// `LpmTrie<CidrKey, u8>`: outbound destinations never captured.
    pub const EXCLUDE_CIDRS: &str = "EXCLUDE_CIDRS";
    /// `Array<u64>`: four port bitmaps per generation, see [`super::PortSet`].
    pub const PORT_SETS: &str = "PORT_SETS";
    /// Socket-local storage (`BPF_MAP_TYPE_SK_STORAGE`) of [`super::SockState`]: lives and dies
    /// with each socket, so nothing has to remove it and nothing evicts it. (The programs name
    /// it in their BTF map definition; user space only pins it, through the loader.)
    pub const SOCKS: &str = "SOCKS";
    /// `HashMap<SockPair, OrigDst>`: the original destination under the application's 4-tuple,
    /// from the application's end being established to the proxy's end being established
    /// (then it moves to the proxy's socket) or the application's socket closing.
    pub const ORIG_BY_PAIR: &str = "ORIG_BY_PAIR";
    /// `SockMap`, two slots ([`super::LISTENER_SLOT_V4`], [`super::LISTENER_SLOT_V6`]): the
    /// proxy's inbound listening sockets.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`], summed over CPUs by `status`.
    pub const COUNTERS: &str = "COUNTERS";
}

/// Elements of `CONTROL`.
pub const CONTROL_GENERATION: u32 = 0;
/// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) until which the programs write debug records: a lease
/// that `mesh-init ebpf --log` renews while it reads them, so a killed reader stops them too.
pub const CONTROL_LOG_UNTIL: u32 = 1;
pub const CONTROL_ENTRIES: u32 = 2;

/// Configuration generations (double buffering, see the crate's documentation).
pub const GENERATIONS: u32 = 2;

/// How many proxy UIDs (and, apart, GIDs) and CIDRs (per flag) one generation holds;
/// `mesh-init`'s `ebpf_limits` refuses more, naming the flag.
pub const MAX_IDS: u32 = 64;
pub const MAX_CIDRS: u32 = 1024;
pub const ID_ENTRIES: u32 = GENERATIONS * MAX_IDS;
pub const CIDR_ENTRIES: u32 = GENERATIONS * MAX_CIDRS;

/// The bound of `ORIG_BY_PAIR`. An entry lives only while a connection is between its two
/// ends' handshakes (microseconds on loopback; longer only when the proxy's accept queue is
/// full and drops the handshake's last ACK), so this bounds a burst, not the open connections.
/// Allocated as used (`BPF_F_NO_PREALLOC`); when full, `Counter::PairMapFull` counts each
/// destination that could not be kept.
pub const PAIR_ENTRIES: u32 = 65536;

/// Slots of `INBOUND_LISTENERS`: one per family, because an IPv6-only listener cannot take IPv4
/// connections and a second `listen()` on `::` would otherwise replace the IPv4 socket.
pub const LISTENER_SLOT_V4: u32 = 0;
pub const LISTENER_SLOT_V6: u32 = 1;

/// The key of `PROXY_UIDS` / `PROXY_GIDS`: the generation in the upper half.
#[inline(always)]
pub const fn id_key(generation: u32, id: u32) -> u64 {
    ((generation as u64) << 32) | id as u64
}

/// The data of an `INCLUDE_CIDRS` / `EXCLUDE_CIDRS` key: the generation, then the address. A
/// prefix of `32 + n` matches the generation exactly and the address's first `n` bits.
pub type CidrKey = [u32; 5];

#[inline(always)]
pub const fn cidr_key(generation: u32, a: &Addr) -> CidrKey {
    [generation, a[0], a[1], a[2], a[3]]
}

/// The port bitmaps in `PORT_SETS`: set `s` of generation `g` holds port `p` at element
/// `(g * 4 + s) * 1024 + p / 64`, bit `p % 64`. 8 KiB per set covers every port, whatever
/// ranges the flags expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum PortSet {
    /// `--istio-outbound-ports`: captured whatever the CIDR.
    IncludeOutbound = 0,
    /// `--istio-local-outbound-ports-exclude`.
    ExcludeOutbound = 1,
    /// `--istio-inbound-ports` when not `*`.
    IncludeInbound = 2,
    /// `--istio-local-exclude-ports`.
    ExcludeInbound = 3,
}

pub const PORT_SET_WORDS: u32 = 1024;
pub const PORT_SETS_PER_GENERATION: u32 = 4;
pub const PORT_SETS_ENTRIES: u32 = GENERATIONS * PORT_SETS_PER_GENERATION * PORT_SET_WORDS;

impl PortSet {
    /// Element index and bit of `port` in `PORT_SETS`, for `generation`.
    #[inline(always)]
    pub const fn slot(self, generation: u32, port: u16) -> (u32, u64) {
        let set = generation * PORT_SETS_PER_GENERATION + self as u32;
        (set * PORT_SET_WORDS + (port as u32 >> 6), 1u64 << (port & 63))
    }
}

/// Config flags.
pub const CFG_INCLUDE_ALL_CIDRS: u32 = 1 << 0;
pub const CFG_INCLUDE_ALL_INBOUND_PORTS: u32 = 1 << 1;
/// Set when at least one outbound port is listed with `--istio-outbound-ports`.
pub const CFG_HAS_INCLUDE_OUTBOUND_PORTS: u32 = 1 << 2;
/// Inbound steering on: off when `--istio-inbound-ports` is empty.
pub const CFG_INBOUND: u32 = 1 << 3;
/// `--inbound-fail-open`: a captured inbound connection that finds no proxy listener goes to
/// the application instead of being refused.
pub const CFG_INBOUND_FAIL_OPEN: u32 = 1 << 4;

/// The scalar settings of one generation, an element of `SETTINGS`. All zero (a fresh map)
/// captures nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Config {
    /// Where redirected outbound connections go (on loopback), host order.
    pub outbound_port: u16,
    /// The port of the proxy's inbound listener, whose sockets fill `INBOUND_LISTENERS`.
    pub inbound_port: u16,
    /// `CFG_*` bits.
    pub flags: u32,
}

/// An address in the form shared by every map: network-order words, IPv4 mapped.
pub type Addr = [u32; 4];

/// A TCP connection seen from one end: `src` is the local side of the socket that stored it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SockPair {
    pub src_ip: Addr,
    pub dst_ip: Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

impl SockPair {
    /// The same connection seen from the other end.
    #[inline(always)]
    pub const fn reversed(&self) -> Self {
        Self { src_ip: self.dst_ip, dst_ip: self.src_ip, src_port: self.dst_port, dst_port: self.src_port }
    }
}

/// Where an application meant to connect before its connect was rewritten to the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct OrigDst {
    /// `Addr` form; for `family == AF_INET` the IPv4 address is the last word.
    pub ip: Addr,
    /// Host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: which `getsockopt` level answers it.
    pub family: u16,
}

/// What the programs know about one socket (`SOCKS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct SockState {
    /// With `SOCK_DIALLED`: where the application's connect was going. With `SOCK_ANSWER`: what
    /// `SO_ORIGINAL_DST` answers on this (the proxy's accepted) socket.
    pub orig: OrigDst,
    /// With `SOCK_OWNER`: who created the socket (the credentials iptables' owner match tests),
    /// recorded at `socket()`.
    pub owner_uid: u32,
    pub owner_gid: u32,
    /// `SOCK_*` bits.
    pub flags: u32,
}

pub const SOCK_OWNER: u32 = 1 << 0;
pub const SOCK_DIALLED: u32 = 1 << 1;
pub const SOCK_ANSWER: u32 = 1 << 2;

/// Event counters in `COUNTERS` (a per-CPU array indexed by these), shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    Redirected = 0,
    Bypassed = 1,
    OrigDstAnswered = 2,
    OrigDstMissed = 3,
    InboundSteered = 4,
    /// A captured inbound connection found no proxy listener and was refused (fail closed).
    InboundRefused = 5,
    /// `ORIG_BY_PAIR` was full: a destination was lost (the proxy will find none).
    PairMapFull = 6,
    /// A socket's state could not be stored (out of socket option memory): a connect was
    /// refused, or a destination lost.
    NotRecorded = 7,
}

pub const COUNTER_NAMES: [&str; 8] = [
    "outbound redirected",
    "outbound bypassed",
    "SO_ORIGINAL_DST answered",
    "SO_ORIGINAL_DST missed",
    "inbound steered",
    "inbound refused",
    "pair map full",
    "not recorded",
];
pub const COUNTERS_ENTRIES: u32 = COUNTER_NAMES.len() as u32;

/// IPv4-mapped form of a network-order IPv4 address.
#[inline(always)]
pub const fn mapped_v4(ip4_be: u32) -> Addr {
    [0, 0, u32::to_be(0xffff), ip4_be]
}

/// True when `a` is an IPv4-mapped IPv6 address.
#[inline(always)]
pub const fn is_mapped_v4(a: &Addr) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::to_be(0xffff)
}

/// 127.0.0.0/8 (mapped) or ::1.
#[inline(always)]
pub const fn is_loopback(a: &Addr) -> bool {
    (is_mapped_v4(a) && (u32::from_be(a[3]) >> 24) == 127)
        || (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::to_be(1))
}

/// 127.0.0.6 (mapped) or ::6 ([`mesh_common::INBOUND_PASSTHROUGH_V4`] and `_V6`): the source the
/// proxy binds when it hands an inbound connection to the local application (mesh-init's iptables
/// rules let it through for the same reason). Such a connection must not be steered back to the
/// proxy.
#[inline(always)]
pub const fn is_inbound_passthrough_source(a: &Addr) -> bool {
    const V6: u128 = mesh_common::INBOUND_PASSTHROUGH_V6.to_bits();
    (is_mapped_v4(a) && u32::from_be(a[3]) == mesh_common::INBOUND_PASSTHROUGH_V4.to_bits())
        || (u32::from_be(a[0]) == (V6 >> 96) as u32
            && u32::from_be(a[1]) == (V6 >> 64) as u32
            && u32::from_be(a[2]) == (V6 >> 32) as u32
            && u32::from_be(a[3]) == V6 as u32)
}

#[cfg(feature = "user")]
mod pod {
    // aya::Pod promises that every bit pattern is a valid value and that there is no padding to
    // leak or compare: true of #[repr(C)] structs of integers whose size is the sum of their
    // fields' (the size assertions below).

    // SAFETY: #[repr(C)], integers only, 8 bytes with no padding (asserted below).
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: #[repr(C)], integers only, 36 bytes with no padding (asserted below).
    unsafe impl aya::Pod for super::SockPair {}
    // SAFETY: #[repr(C)], integers only, 20 bytes with no padding (asserted below).
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::SockState {}

    const _: () = assert!(core::mem::size_of::<super::Config>() == 8);
    const _: () = assert!(core::mem::size_of::<super::SockPair>() == 36);
    const _: () = assert!(core::mem::size_of::<super::SockState>() == 32);
    const _: () = assert!(core::mem::size_of::<super::OrigDst>() == 20);
}

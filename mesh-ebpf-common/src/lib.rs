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
    /// `Array<Config>`, one element.
    pub const CONFIG: &str = "CONFIG";
    /// `HashMap<u32, u8>`: UIDs whose connections are never redirected.
    pub const PROXY_UIDS: &str = "PROXY_UIDS";
    /// `HashMap<u32, u8>`: GIDs whose connections are never redirected.
    pub const PROXY_GIDS: &str = "PROXY_GIDS";
    /// `LpmTrie<[u32; 4], u8>`: outbound destinations captured when not all are.
    pub const INCLUDE_CIDRS: &str = "INCLUDE_CIDRS";
    /// `LpmTrie<[u32; 4], u8>`: outbound destinations never captured.
    pub const EXCLUDE_CIDRS: &str = "EXCLUDE_CIDRS";
    /// `Array<u64>`: four port bitmaps, see [`super::PortSet`].
    pub const PORT_SETS: &str = "PORT_SETS";
    /// `LruHashMap<u64, OrigDst>`: socket cookie -> original destination, from connect to
    /// ESTABLISHED.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `LruHashMap<SockPair, OrigDst>`: the application's 4-tuple -> original destination, from
    /// ESTABLISHED to the close of the proxy's accepted socket.
    pub const ORIG_BY_PAIR: &str = "ORIG_BY_PAIR";
    /// `SockMap`, two slots ([`super::LISTENER_SLOT_V4`], [`super::LISTENER_SLOT_V6`]): the
    /// proxy's inbound listening sockets.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// `SockHash<SockPair>`: both ends of loopback app<->proxy connections (`--accelerate`).
    pub const LOCAL_SOCKS: &str = "LOCAL_SOCKS";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`], summed over CPUs by `status`.
    pub const COUNTERS: &str = "COUNTERS";

    /// Every map mesh-init pins (the log ring buffer of aya-log is per load and not pinned).
    pub const PINNED: [&str; 11] = [
        CONFIG,
        PROXY_UIDS,
        PROXY_GIDS,
        INCLUDE_CIDRS,
        EXCLUDE_CIDRS,
        PORT_SETS,
        ORIG_BY_COOKIE,
        ORIG_BY_PAIR,
        INBOUND_LISTENERS,
        LOCAL_SOCKS,
        COUNTERS,
    ];
}

/// Capacities. The connection maps are LRU and preallocated (about 100 bytes an entry, per pod):
/// with more connections than they hold, the oldest entries are evicted instead of memory
/// growing. An entry is needed only for a short time: by cookie from connect to ESTABLISHED, by
/// 4-tuple until the proxy has asked `SO_ORIGINAL_DST` right after accept; evicting an older
/// one costs nothing. So these are sized for bursts of new connections, not for the number of
/// open ones (about 6 MB in all). The sockhash is not LRU: when full, a new connection simply
/// is not accelerated.
pub const ORIG_BY_COOKIE_ENTRIES: u32 = 16384;
pub const ORIG_BY_PAIR_ENTRIES: u32 = 32768;
pub const LOCAL_SOCKS_ENTRIES: u32 = 32768;
/// How many proxy UIDs (and, apart, GIDs) and CIDRs (per flag) the configuration maps hold;
/// `mesh-init`'s `ebpf_limits` refuses more, naming the flag.
pub const MAX_IDS: u32 = 64;
pub const MAX_CIDRS: u32 = 1024;
pub const ID_ENTRIES: u32 = MAX_IDS;
pub const CIDR_ENTRIES: u32 = MAX_CIDRS;

/// Slots of `INBOUND_LISTENERS`: one per family, because an IPv6-only listener cannot take IPv4
/// connections and a second `listen()` on `::` would otherwise replace the IPv4 socket.
pub const LISTENER_SLOT_V4: u32 = 0;
pub const LISTENER_SLOT_V6: u32 = 1;

/// The port bitmaps in `PORT_SETS`: set `s` holds port `p` at element `s * 1024 + p / 64`,
/// bit `p % 64`. 8 KiB per set covers every port, whatever ranges the flags expand to.
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
pub const PORT_SETS_ENTRIES: u32 = 4 * PORT_SET_WORDS;

impl PortSet {
    /// Element index and bit of `port` in `PORT_SETS`.
    #[inline(always)]
    pub const fn slot(self, port: u16) -> (u32, u64) {
        (self as u32 * PORT_SET_WORDS + (port as u32 >> 6), 1u64 << (port & 63))
    }
}

/// Config flags.
pub const CFG_INCLUDE_ALL_CIDRS: u32 = 1 << 0;
pub const CFG_INCLUDE_ALL_INBOUND_PORTS: u32 = 1 << 1;
pub const CFG_ACCELERATE: u32 = 1 << 2;
/// Set when at least one outbound port is listed with `--istio-outbound-ports`.
pub const CFG_HAS_INCLUDE_OUTBOUND_PORTS: u32 = 1 << 3;
/// Inbound steering on: off when `--istio-inbound-ports` is empty.
pub const CFG_INBOUND: u32 = 1 << 4;
/// `mesh-init ebpf --log` is reading: the programs write their debug records. Off otherwise, so
/// that nobody pays for records nobody reads; a runtime switch, so turning it on or off needs
/// no reload.
pub const CFG_LOG: u32 = 1 << 5;

/// The scalar settings, element 0 of `CONFIG`.
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

/// Event counters in `COUNTERS` (a per-CPU array indexed by these), shown by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    Redirected = 0,
    Bypassed = 1,
    OrigDstAnswered = 2,
    OrigDstMissed = 3,
    InboundSteered = 4,
    Accelerated = 5,
    /// sk_msg sends handed straight to the peer socket.
    MsgRedirected = 6,
}

pub const COUNTER_NAMES: [&str; 7] = [
    "outbound redirected",
    "outbound bypassed",
    "SO_ORIGINAL_DST answered",
    "SO_ORIGINAL_DST missed",
    "inbound steered",
    "sockets accelerated",
    "messages redirected",
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

    const _: () = assert!(core::mem::size_of::<super::Config>() == 8);
    const _: () = assert!(core::mem::size_of::<super::SockPair>() == 36);
    const _: () = assert!(core::mem::size_of::<super::OrigDst>() == 20);
}

//! Every map, pinned by name under the cgroup's directory so that a re-run reuses them (and the
//! connections in flight keep their entries) and the programs outlive the loader.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use mesh_ebpf_common::{
    Addr, Config, Counter, OrigDst, PortSet, SockPair, CIDR_ENTRIES, COUNTERS_ENTRIES, ID_ENTRIES, LOCAL_SOCKS_ENTRIES,
    ORIG_BY_COOKIE_ENTRIES, ORIG_BY_PAIR_ENTRIES, PORT_SETS_ENTRIES,
};

/// `BPF_F_NO_PREALLOC`: required by LPM tries.
const NO_PREALLOC: u32 = 1;

#[map]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);
#[map]
pub static PROXY_UIDS: HashMap<u32, u8> = HashMap::pinned(ID_ENTRIES, 0);
#[map]
pub static PROXY_GIDS: HashMap<u32, u8> = HashMap::pinned(ID_ENTRIES, 0);
#[map]
pub static INCLUDE_CIDRS: LpmTrie<Addr, u8> = LpmTrie::pinned(CIDR_ENTRIES, NO_PREALLOC);
#[map]
pub static EXCLUDE_CIDRS: LpmTrie<Addr, u8> = LpmTrie::pinned(CIDR_ENTRIES, NO_PREALLOC);
#[map]
pub static PORT_SETS: Array<u64> = Array::pinned(PORT_SETS_ENTRIES, 0);
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(ORIG_BY_COOKIE_ENTRIES, 0);
#[map]
pub static ORIG_BY_PAIR: LruHashMap<SockPair, OrigDst> = LruHashMap::pinned(ORIG_BY_PAIR_ENTRIES, 0);
#[map]
pub static INBOUND_LISTENERS: SockMap = SockMap::pinned(2, 0);
#[map]
pub static LOCAL_SOCKS: SockHash<SockPair> = SockHash::pinned(LOCAL_SOCKS_ENTRIES, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_ENTRIES, 0);

/// The settings, or `None` before the loader has written them (then nothing is captured).
#[inline(always)]
pub fn config() -> Option<Config> {
    CONFIG.get(0).copied()
}

#[inline(always)]
pub fn port_in(set: PortSet, port: u16) -> bool {
    let (index, bit) = set.slot(port);
    PORT_SETS.get(index).is_some_and(|w| w & bit != 0)
}

#[inline(always)]
pub fn cidr_in(trie: &LpmTrie<Addr, u8>, addr: &Addr) -> bool {
    trie.get(aya_ebpf::maps::lpm_trie::Key::new(128, *addr)).is_some()
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's element, valid for the map's lifetime; per-CPU, so no other CPU
        // writes it (the BPF target has no atomic read-modify-write in `core`).
        unsafe { *p += 1 };
    }
}

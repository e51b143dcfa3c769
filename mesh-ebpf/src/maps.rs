//! Every map, pinned by name under the cgroup's directory so that a re-run reuses them (and the
//! connections in flight keep their state) and the programs outlive the loader; and the
//! accessors the programs share: the active configuration generation, the per-socket state,
//! the counters and the `--log` lease.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::{bpf_ktime_get_ns, bpf_sk_storage_get},
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, SockMap},
};
use mesh_ebpf_common::{
    cidr_key, id_key, Addr, CidrKey, Config, Counter, OrigDst, PortSet, SockPair, SockState, CIDR_ENTRIES,
    CONTROL_ENTRIES, CONTROL_GENERATION, CONTROL_LOG_UNTIL, COUNTERS_ENTRIES, GENERATIONS, ID_ENTRIES, PAIR_ENTRIES,
    PORT_SETS_ENTRIES,
};

/// `BPF_F_NO_PREALLOC`: required by LPM tries and socket storage; for `ORIG_BY_PAIR`, memory
/// only for the entries in use.
const NO_PREALLOC: u32 = 1;

#[map]
pub static CONTROL: Array<u64> = Array::pinned(CONTROL_ENTRIES, 0);
#[map]
pub static SETTINGS: Array<Config> = Array::pinned(GENERATIONS, 0);
#[map]
pub static PROXY_UIDS: HashMap<u64, u8> = HashMap::pinned(ID_ENTRIES, 0);
#[map]
pub static PROXY_GIDS: HashMap<u64, u8> = HashMap::pinned(ID_ENTRIES, 0);
#[map]
pub static INCLUDE_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::pinned(CIDR_ENTRIES, NO_PREALLOC);
#[map]
pub static EXCLUDE_CIDRS: LpmTrie<CidrKey, u8> = LpmTrie::pinned(CIDR_ENTRIES, NO_PREALLOC);
#[map]
pub static PORT_SETS: Array<u64> = Array::pinned(PORT_SETS_ENTRIES, 0);
#[map]
pub static ORIG_BY_PAIR: HashMap<SockPair, OrigDst> = HashMap::pinned(PAIR_ENTRIES, NO_PREALLOC);
#[map]
pub static INBOUND_LISTENERS: SockMap = SockMap::pinned(2, 0);
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS_ENTRIES, 0);

/// A socket storage map definition in the BTF form the loader reads (`.maps` section, each
/// field's type carrying a number): socket storage needs BTF for its key and value. Written out
/// here because aya-ebpf's `SkStorage` has no `pinning` field, and this map must be pinned like
/// the others so that a re-run's programs see the state of sockets that already exist.
#[repr(C)]
pub struct PinnedSockStorage {
    r#type: *const [i32; 24], // BPF_MAP_TYPE_SK_STORAGE
    key: *const i32,          // a socket's file descriptor, from user space
    value: *const SockState,
    max_entries: *const [i32; 0], // socket storage has no bound: it lives in the sockets
    map_flags: *const [i32; 1],   // BPF_F_NO_PREALLOC
    pinning: *const [i32; 1],     // LIBBPF_PIN_BY_NAME
}

// SAFETY: the fields are never dereferenced; the loader reads their BTF types and replaces
// every reference to the static with the map.
unsafe impl Sync for PinnedSockStorage {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "SOCKS")]
pub static SOCKS: PinnedSockStorage = PinnedSockStorage {
    r#type: ptr::null(),
    key: ptr::null(),
    value: ptr::null(),
    max_entries: ptr::null(),
    map_flags: ptr::null(),
    pinning: ptr::null(),
};

/// The state of socket `sk` (a socket pointer of the context, or the context itself where the
/// context is the socket), or null when it has none.
///
/// # Safety
/// `sk` must be a socket pointer the verifier accepts for `bpf_sk_storage_get`.
#[inline(always)]
pub unsafe fn sock_state(sk: *mut c_void) -> *mut SockState {
    let map = ptr::addr_of!(SOCKS) as *mut c_void;
    // SAFETY: `map` is the socket storage map (the loader puts the map in its place); `sk` is
    // the caller's promise; no value pointer, no flags: a pure lookup.
    unsafe { bpf_sk_storage_get(map, sk, ptr::null_mut(), 0) as *mut SockState }
}

/// The state of socket `sk`, created as `init` when it has none; null when it cannot be
/// created (socket option memory exhausted).
///
/// # Safety
/// As for [`sock_state`].
#[inline(always)]
pub unsafe fn sock_state_or_create(sk: *mut c_void, init: &mut SockState) -> *mut SockState {
    let map = ptr::addr_of!(SOCKS) as *mut c_void;
    let init = init as *mut SockState as *mut c_void;
    // SAFETY: as in `sock_state`; `init` points to a whole `SockState` on the stack, which the
    // kernel copies into the storage it creates.
    unsafe { bpf_sk_storage_get(map, sk, init, BPF_SK_STORAGE_GET_F_CREATE as u64) as *mut SockState }
}

/// The active generation and its settings. A fresh map holds zeros: nothing is captured.
#[inline(always)]
pub fn settings() -> Option<(u32, Config)> {
    let generation = (*CONTROL.get(CONTROL_GENERATION)? as u32) & (GENERATIONS - 1);
    Some((generation, *SETTINGS.get(generation)?))
}

#[inline(always)]
pub fn port_in(generation: u32, set: PortSet, port: u16) -> bool {
    let (index, bit) = set.slot(generation, port);
    PORT_SETS.get(index).is_some_and(|w| w & bit != 0)
}

#[inline(always)]
pub fn cidr_in(trie: &LpmTrie<CidrKey, u8>, generation: u32, addr: &Addr) -> bool {
    trie.get(aya_ebpf::maps::lpm_trie::Key::new(160, cidr_key(generation, addr))).is_some()
}

#[inline(always)]
pub fn id_in(ids: &HashMap<u64, u8>, generation: u32, id: u32) -> bool {
    // SAFETY: a read-only lookup of a plain value.
    unsafe { ids.get(id_key(generation, id)).is_some() }
}

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's element, valid for the map's lifetime; per-CPU, so no other CPU
        // writes it (the BPF target has no atomic read-modify-write in `core`).
        unsafe { *p += 1 };
    }
}

/// Whether `mesh-init ebpf --log` holds a current lease: only then are debug records written.
#[inline(always)]
pub fn logging() -> bool {
    let until = CONTROL.get(CONTROL_LOG_UNTIL).copied().unwrap_or(0);
    // SAFETY: a helper without arguments.
    until != 0 && unsafe { bpf_ktime_get_ns() } < until
}

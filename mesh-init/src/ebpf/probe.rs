//! What the kernel must offer, checked before anything is created: each program type with the
//! attach type it is loaded for, each helper each program calls, and cgroup links. A kernel
//! without one of them would otherwise fail half way, with a bare "Invalid argument" from the
//! program load and maps already pinned; here it gets one sentence naming the feature and the
//! first Linux release that has it, and nothing is left behind.
//!
//! Each check loads a two- or three-instruction program of the type (`r0 = 1; exit`, with a
//! helper call first for a helper) and reads the answer the way libbpf's probes do: a type or
//! attach type the kernel does not know is refused with `EINVAL` and an empty verifier log; an
//! unknown helper with "unknown func" / "invalid func" / "program of this type cannot use
//! helper" in the log. Any other verdict means the kernel knows it. Probes are unloaded at once.
//!
//! Only the hooks the flags need are checked (and loaded, see `attach`): without inbound
//! capture, `sk_lookup` is neither.
//!
//! The minimum for everything is Linux 5.9 (sk_lookup, socket storage in cgroup socket
//! programs); 5.8 without inbound capture.

use std::os::fd::{FromRawFd as _, OwnedFd};

use super::{plan::MapPlan, raw_link};

/// The environment variable that makes this process treat one program type as a kernel
/// without it would: its probe and its load are refused (`EINVAL`). The tests use it to show
/// what happens on such a kernel; its value is a [`Hook::kind`] (`sk_lookup`, `sock_ops`,
/// `cgroup_sock_addr`, `cgroup_sock`, `cgroup_sockopt`).
pub const REFUSE_ENV: &str = "MESH_INIT_EBPF_REFUSE_PROGRAM";

/// A program of the object, by the hook it is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Connect4,
    Connect6,
    GetPeerName4,
    GetPeerName6,
    SockCreate,
    SockOps,
    GetSockopt,
    SkLookup,
}

/// `enum bpf_prog_type` and `enum bpf_attach_type` (include/uapi/linux/bpf.h).
mod uapi {
    pub const CGROUP_SOCK: u32 = 9;
    pub const SOCK_OPS: u32 = 13;
    pub const CGROUP_SOCK_ADDR: u32 = 18;
    pub const CGROUP_SOCKOPT: u32 = 25;
    pub const SK_LOOKUP: u32 = 30;

    pub const INET_SOCK_CREATE: u32 = 2;
    pub const INET4_CONNECT: u32 = 10;
    pub const INET6_CONNECT: u32 = 11;
    pub const GETSOCKOPT: u32 = 21;
    pub const INET4_GETPEERNAME: u32 = 29;
    pub const INET6_GETPEERNAME: u32 = 30;
    pub const ATTACH_SK_LOOKUP: u32 = 36;
}

/// A helper: its number (`enum bpf_func_id`), name, and the release that lets the program
/// types below call it.
#[derive(Debug, Clone, Copy)]
struct Helper {
    id: i32,
    name: &'static str,
    since: &'static str,
}

const GET_CURRENT_UID_GID: Helper = Helper { id: 15, name: "bpf_get_current_uid_gid", since: "4.17" };
const SK_STORAGE_GET: Helper = Helper { id: 107, name: "bpf_sk_storage_get", since: "5.3" };
const SK_STORAGE_GET_CGROUP_SOCK: Helper = Helper { id: 107, name: "bpf_sk_storage_get", since: "5.9" };
const SOCK_MAP_UPDATE: Helper = Helper { id: 53, name: "bpf_sock_map_update", since: "4.14" };
const SOCK_OPS_CB_FLAGS_SET: Helper = Helper { id: 59, name: "bpf_sock_ops_cb_flags_set", since: "4.17" };
const SK_ASSIGN: Helper = Helper { id: 124, name: "bpf_sk_assign", since: "5.9" };
/// The `--log` records (aya-log's ring buffer), in every program.
const RINGBUF_RESERVE: Helper = Helper { id: 131, name: "bpf_ringbuf_reserve", since: "5.8" };

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::GetPeerName4,
        Hook::GetPeerName6,
        Hook::SockCreate,
        Hook::SockOps,
        Hook::GetSockopt,
        Hook::SkLookup,
    ];

    /// The hooks `plan` needs: `sk_lookup` only with inbound capture.
    pub fn needed(plan: &MapPlan) -> impl Iterator<Item = Hook> + '_ {
        Self::ALL.into_iter().filter(|h| *h != Hook::SkLookup || plan.inbound)
    }

    /// The program type's name, as `bpftool` and [`REFUSE_ENV`] spell it.
    pub fn kind(self) -> &'static str {
        match self.prog_type() {
            uapi::CGROUP_SOCK_ADDR => "cgroup_sock_addr",
            uapi::CGROUP_SOCK => "cgroup_sock",
            uapi::SOCK_OPS => "sock_ops",
            uapi::CGROUP_SOCKOPT => "cgroup_sockopt",
            _ => "sk_lookup",
        }
    }

    fn prog_type(self) -> u32 {
        match self {
            Hook::Connect4 | Hook::Connect6 | Hook::GetPeerName4 | Hook::GetPeerName6 => uapi::CGROUP_SOCK_ADDR,
            Hook::SockCreate => uapi::CGROUP_SOCK,
            Hook::SockOps => uapi::SOCK_OPS,
            Hook::GetSockopt => uapi::CGROUP_SOCKOPT,
            Hook::SkLookup => uapi::SK_LOOKUP,
        }
    }

    /// The expected attach type the program is loaded with (sock_ops programs have none).
    fn attach_type(self) -> u32 {
        match self {
            Hook::Connect4 => uapi::INET4_CONNECT,
            Hook::Connect6 => uapi::INET6_CONNECT,
            Hook::GetPeerName4 => uapi::INET4_GETPEERNAME,
            Hook::GetPeerName6 => uapi::INET6_GETPEERNAME,
            Hook::SockCreate => uapi::INET_SOCK_CREATE,
            Hook::SockOps => 0,
            Hook::GetSockopt => uapi::GETSOCKOPT,
            Hook::SkLookup => uapi::ATTACH_SK_LOOKUP,
        }
    }

    /// What the hook is, for people, and the first release that has it.
    fn feature(self) -> (&'static str, &'static str) {
        match self {
            Hook::Connect4 | Hook::Connect6 => ("cgroup connect hooks (cgroup_sock_addr connect4/connect6)", "4.17"),
            Hook::GetPeerName4 | Hook::GetPeerName6 => {
                ("cgroup getpeername hooks (cgroup_sock_addr getpeername4/getpeername6)", "5.8")
            }
            Hook::SockCreate => ("the cgroup socket-creation hook (cgroup_sock sock_create)", "4.17"),
            Hook::SockOps => ("sock_ops programs", "4.13"),
            Hook::GetSockopt => ("the cgroup getsockopt hook (cgroup_sockopt)", "5.3"),
            Hook::SkLookup => ("sk_lookup programs (inbound steering)", "5.9"),
        }
    }

    fn helpers(self) -> &'static [Helper] {
        match self {
            Hook::Connect4 | Hook::Connect6 => &[GET_CURRENT_UID_GID, SK_STORAGE_GET, RINGBUF_RESERVE],
            Hook::GetPeerName4 | Hook::GetPeerName6 => &[SK_STORAGE_GET],
            Hook::SockCreate => &[GET_CURRENT_UID_GID, SK_STORAGE_GET_CGROUP_SOCK],
            Hook::SockOps => &[SK_STORAGE_GET, SOCK_MAP_UPDATE, SOCK_OPS_CB_FLAGS_SET, RINGBUF_RESERVE],
            Hook::GetSockopt => &[SK_STORAGE_GET, RINGBUF_RESERVE],
            Hook::SkLookup => &[SK_ASSIGN, RINGBUF_RESERVE],
        }
    }

    /// Whether [`REFUSE_ENV`] names this hook's program type.
    pub fn refused(self) -> bool {
        std::env::var(REFUSE_ENV).is_ok_and(|v| v == self.kind())
    }

    /// The error for a kernel without this hook.
    pub fn missing(self) -> Missing {
        let (feature, since) = self.feature();
        Missing::new(feature.to_string(), since)
    }
}

/// A feature the kernel lacks.
#[derive(Debug, thiserror::Error)]
#[error("this kernel ({release}) lacks {feature}, which mesh-init ebpf needs: Linux {since} or newer has it ({hint})")]
pub struct Missing {
    feature: String,
    since: &'static str,
    release: String,
    hint: &'static str,
}

impl Missing {
    fn new(feature: String, since: &'static str) -> Self {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|r| r.trim().to_string())
            .unwrap_or_else(|_| "unknown release".into());
        Self { feature, since, release, hint: "nothing was installed; `mesh-init iptables` works on older kernels" }
    }
}

/// Every feature `plan` needs, in the order the hooks run; the first one missing is the error.
pub fn check(plan: &MapPlan) -> Result<(), Missing> {
    if !links_supported() {
        return Err(Missing::new("BPF links (BPF_LINK_CREATE)".into(), "5.7"));
    }
    for hook in Hook::needed(plan) {
        if !loads(hook, None) {
            return Err(hook.missing());
        }
        for helper in hook.helpers() {
            if !loads(hook, Some(helper.id)) {
                let (feature, _) = hook.feature();
                return Err(Missing::new(format!("the helper {} in {feature}", helper.name), helper.since));
            }
        }
    }
    Ok(())
}

/// Whether the kernel knows `BPF_LINK_CREATE`: with invalid descriptors it answers `EBADF`
/// when it does, `EINVAL` for an unknown command.
fn links_supported() -> bool {
    let mut attr = [u64::MAX, 0, 0, 0, 0, 0, 0, 0];
    match raw_link::bpf(raw_link::BPF_LINK_CREATE, &mut attr) {
        Ok(fd) => {
            // SAFETY: a descriptor the kernel just returned, owned here only.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

/// Whether a minimal program of `hook`'s type and attach type (calling `helper` first, if
/// given) is accepted, or refused for another reason than an unknown type or helper.
fn loads(hook: Hook, helper: Option<i32>) -> bool {
    if hook.refused() {
        return false;
    }
    // struct bpf_insn { u8 code; u8 dst_reg:4, src_reg:4; s16 off; s32 imm; }
    let insn = |code: u8, imm: i32| u64::from(code) | (u64::from(imm as u32) << 32);
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const MOV_R0_IMM: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K, dst r0
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    let mut insns = Vec::with_capacity(3);
    if let Some(id) = helper {
        insns.push(insn(CALL, id));
    }
    insns.extend([insn(MOV_R0_IMM, 1), insn(EXIT, 0)]);
    // The programs' own licence: a probe must not be allowed what they are not.
    let license = c"Apache-2.0";
    let mut log = vec![0u8; 4096];
    // { u32 prog_type; u32 insn_cnt; u64 insns; u64 license; u32 log_level; u32 log_size;
    //   u64 log_buf; u32 kern_version; u32 prog_flags; char prog_name[16]; u32 prog_ifindex;
    //   u32 expected_attach_type; }
    let mut attr = [0u64; 9];
    attr[0] = u64::from(hook.prog_type()) | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32);
    attr[4] = log.as_mut_ptr() as u64;
    attr[8] = u64::from(hook.attach_type()) << 32;
    match raw_link::bpf(raw_link::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => {
            // SAFETY: a descriptor the kernel just returned, owned here only; closing it
            // unloads the probe.
            drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
            true
        }
        Err(e) => {
            let text =
                String::from_utf8_lossy(&log[..log.iter().position(|b| *b == 0).unwrap_or(log.len())]).into_owned();
            if text.is_empty() {
                // Refused before the verifier ran: an unknown program or attach type.
                return e.raw_os_error() != Some(libc::EINVAL) && e.raw_os_error() != Some(libc::E2BIG);
            }
            !["unknown func ", "invalid func ", "program of this type cannot use helper "]
                .iter()
                .any(|unknown| text.contains(unknown))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hook_has_a_kind_the_refusal_variable_can_name() {
        for hook in Hook::ALL {
            assert!(
                ["cgroup_sock_addr", "cgroup_sock", "sock_ops", "cgroup_sockopt", "sk_lookup"].contains(&hook.kind())
            );
        }
    }

    #[test]
    fn a_missing_feature_is_one_sentence_naming_it_and_the_release() {
        let text = Hook::SkLookup.missing().to_string();
        assert!(text.contains("sk_lookup programs") && text.contains("Linux 5.9 or newer"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }
}

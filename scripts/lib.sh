# Shared by the scripts: removal of what an interrupted run left behind.
#
# Test and demo objects carry their creator's PID in their name (mesh-<tag>-<pid>-<n>), so a
# leftover is recognised by a PID that no longer runs; objects of live runs are never touched.

# Deletes namespaces, cgroups and bpffs pins named mesh-*-<pid>-<n> whose <pid> is gone.
mesh_reap_stale() {
  local ns pid cg_root cg pin
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^mesh-' || true); do
    pid=$(echo "$ns" | awk -F- '{print $(NF-1)}')
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null && echo "[cleanup] removed stale netns $ns" >&2
    fi
  done
  cg_root=$(awk '/ - cgroup2 / {print $5; exit}' /proc/self/mountinfo)
  [ -n "$cg_root" ] || return 0
  for cg in "$cg_root"/mesh-*; do
    [ -d "$cg" ] || continue
    pid=$(basename "$cg" | awk -F- '{print $(NF-1)}')
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
      for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      rmdir "$cg" 2>/dev/null && echo "[cleanup] removed stale cgroup $cg" >&2
    fi
  done
  # mesh-init ebpf pins under <bpffs>/mesh-init/<cgroup path, '/' as %2F>; a top-level test
  # cgroup's pins are named like the cgroup. Unpinning releases the programs and links.
  for pin in /sys/fs/bpf/mesh-init/mesh-*; do
    [ -e "$pin" ] || continue
    pid=$(basename "$pin" | awk -F- '{print $(NF-1)}')
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
      rm -rf "$pin" && echo "[cleanup] removed stale pins $pin" >&2
    fi
  done
  rmdir /sys/fs/bpf/mesh-init 2>/dev/null || true
}

# Unmounts bpffs when it was not mounted before this run (argument: 1 if it was) and nothing of
# mesh-init is pinned there, so the machine is left as it was found. The kernel's own
# maps.debug/progs.debug iterators appear on every bpffs mount and are not ours.
mesh_unmount_bpffs_if_ours() {
  [ "${1:-1}" = 0 ] || return 0
  mountpoint -q /sys/fs/bpf || return 0
  [ -e /sys/fs/bpf/mesh-init ] && return 0
  umount /sys/fs/bpf 2>/dev/null || true
}

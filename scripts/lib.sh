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
      for pin in /sys/fs/bpf/mesh-init/*; do
        [ -e "$pin/cgroup" ] && grep -qx "$cg" "$pin/cgroup" 2>/dev/null && rm -rf "$pin"
      done
      for p in $(cat "$cg/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      rmdir "$cg" 2>/dev/null && echo "[cleanup] removed stale cgroup $cg" >&2
    fi
  done
}

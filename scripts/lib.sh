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
      # Tests may nest pod-like cgroups inside their own (kubepods.slice/...): leaves first.
      for p in $(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null && echo "[cleanup] removed stale cgroup $cg" >&2
    fi
  done
  # mesh-init ebpf pins under <bpffs>/mesh-init/<cgroup path, escaped>/ (mesh_pin_cgroup); a
  # test's cgroup path starts with its own top-level cgroup, named like the other objects.
  # Unpinning releases the programs and links.
  for pin in /sys/fs/bpf/mesh-init/mesh-*; do
    [ -e "$pin" ] || continue
    cg=$(mesh_pin_cgroup "$(basename "$pin")")
    pid=$(echo "${cg%%/*}" | awk -F- '{print $(NF-1)}')
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
      rm -rf "$pin" && echo "[cleanup] removed stale pins $pin" >&2
    fi
  done
  rmdir /sys/fs/bpf/mesh-init 2>/dev/null || true
  # Per-namespace configuration (`ip netns exec` mounts /etc/netns/<ns>/resolv.conf), named
  # after the test's namespace.
  local etc
  for etc in /etc/netns/mesh-*; do
    [ -d "$etc" ] || continue
    pid=$(basename "$etc" | awk -F- '{print $(NF-1)}')
    if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
      rm -rf "$etc" && echo "[cleanup] removed stale $etc" >&2
    fi
  done
  # podman pods of the container-runtime test (tests/tests/containers.rs); podman removes their
  # network namespaces and containers with them.
  if command -v podman >/dev/null 2>&1; then
    local conf pod
    conf="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/containers.conf"
    for pod in $(CONTAINERS_CONF="$conf" podman pod ls --format '{{.Name}}' 2>/dev/null | grep '^mesh-' || true); do
      pid=$(echo "$pod" | awk -F- '{print $(NF-1)}')
      if [[ "$pid" =~ ^[0-9]+$ ]] && [ ! -d "/proc/$pid" ]; then
        CONTAINERS_CONF="$conf" podman pod rm -f "$pod" >/dev/null 2>&1 && echo "[cleanup] removed stale pod $pod" >&2
      fi
    done
  fi
}

# The cgroup path (below the cgroup2 mount) of a mesh-init pin directory's name: '/', '.' and '%'
# are written %2F, %2E and %25 there (bpffs refuses '.'), as mesh-init/src/ebpf/cgroup.rs does.
mesh_pin_cgroup() {
  printf '%s\n' "$1" | sed -e 's|%2F|/|g' -e 's|%2E|.|g' -e 's|%25|%|g'
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

#!/usr/bin/env bash
# Runs every test: unit, golden, and end-to-end tests in network namespaces (root needed for
# those; with CI set they fail instead of skipping). Installs what a fresh machine lacks first.
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

bash scripts/setup.sh
# cargo's binaries (bpf-linker), the sbin directories (iptables), python's scripts (kubernetes-validate).
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

mesh_reap_stale
bpffs_was_mounted=$(mountpoint -q /sys/fs/bpf && echo 1 || echo 0)
trap 'mesh_reap_stale; mesh_unmount_bpffs_if_ours "$bpffs_was_mounted"' EXIT

# The e2e tests run the binaries: build them first, in the same target directory. Only the
# default members: mesh-ebpf is built for the BPF target by mesh-init/build.rs, never for the host.
cargo build --bins --locked
cargo test --locked --no-fail-fast "$@"

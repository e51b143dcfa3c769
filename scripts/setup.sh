#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build and test mesh-init, skipping what is there.
#
#   scripts/setup.sh            Debian packages, kubernetes-validate, the eBPF toolchain (nightly rust-src, bpf-linker)
#   scripts/setup.sh --no-ebpf  the same without the eBPF toolchain (iptables mode needs nothing else)
#
# Idempotent: every step checks before it installs. Needs root for apt-get.
set -euo pipefail

want_ebpf=1
[ "${1:-}" = "--no-ebpf" ] && want_ebpf=0

log() { printf '[setup] %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------
# command -> package that provides it
declare -A pkg_of=(
  [iptables-restore]=iptables
  [iptables-legacy-restore]=iptables
  [bpftool]=bpftool
  [wrk]=wrk
  [nginx]=nginx-light
  [haproxy]=haproxy
  [iperf3]=iperf3
  [curl]=curl
  [ip]=iproute2
  [nsenter]=util-linux
  [conntrack]=conntrack
  [nft]=nftables
  [dig]=bind9-dnsutils
)
missing=()
for cmd in "${!pkg_of[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
    missing+=("${pkg_of[$cmd]}")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # nginx/haproxy/iperf3 must not start system services on the machine's own namespace.
  # A policy-rc.d the machine already has (container images ship one) is left as it is.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages: all present"
fi

# --- Kubernetes schema validation (inject's golden files and deploy/ are checked offline) -----
# The PyPI package ships the schemas, so no cluster and no network beyond PyPI are needed.
if ! kubernetes-validate --version >/dev/null 2>&1; then
  log "installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet kubernetes-validate==1.37.0 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate==1.37.0
  command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
fi

# --- Clients and servers of the protocol tests (tests/tests/protocols.rs) ----------------------
# WebSocket and gRPC from PyPI; HTTP/2 clients (h2load, nghttp) from Debian's nghttp2-client.
if ! command -v h2load >/dev/null 2>&1; then
  log "installing nghttp2-client"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null; }
fi
if ! python3 -c 'import websockets, grpc' >/dev/null 2>&1; then
  log "installing websockets and grpcio (PyPI)"
  python3 -m pip install --quiet websockets==17.4 grpcio==1.85.3 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages websockets==17.4 grpcio==1.85.3
fi

[ "$want_ebpf" = 1 ] || exit 0

# --- eBPF toolchain ----------------------------------------------------------
# aya's eBPF crate is built with nightly + build-std, so nightly needs rust-src. The nightly is
# pinned in rust-toolchain-nightly (mesh-init/build.rs builds with it).
nightly=$(cat "$(dirname "$0")/../rust-toolchain-nightly")
if ! rustup toolchain list | grep -q "^$nightly"; then
  log "installing the $nightly toolchain"
  rustup toolchain install "$nightly" --profile minimal
fi
if ! rustup component list --toolchain "$nightly" --installed | grep -q '^rust-src'; then
  log "adding rust-src to $nightly"
  rustup component add rust-src --toolchain "$nightly"
fi

# bpf-linker must link against the same LLVM major as nightly rustc. Debian 12 has no LLVM 22,
# but the nightly toolchain ships its own libLLVM: build bpf-linker against that.
sysroot=$(rustc "+$nightly" --print sysroot)
major=$(rustc "+$nightly" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
prefix="$HOME/.cache/mesh-init/llvm-$major"   # kept as RUNPATH in the binary: not /tmp
if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version >/dev/null 2>&1 \
   && [ -e "$prefix/lib/libLLVM.so" ]; then
  log "bpf-linker: present ($(bpf-linker --version))"
else
  log "building bpf-linker against nightly's LLVM $major (about 2 minutes)"
  mkdir -p "$prefix/lib"
  for f in "$sysroot"/lib/libLLVM*; do ln -sf "$f" "$prefix/lib/"; done
  ln -sf "$(ls "$sysroot"/lib/libLLVM.so.*-rust-* | head -n1)" "$prefix/lib/libLLVM.so"
  LLVM_PREFIX="$prefix" cargo install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features "llvm-$major" --force
  bpf-linker --version >/dev/null
fi

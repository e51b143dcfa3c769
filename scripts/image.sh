#!/usr/bin/env bash
# Builds the two images with podman, from a Debian base made here with debootstrap: nothing comes
# from Docker Hub or any other image registry.
#
#   scripts/image.sh [--hub HUB] [--tag TAG] [--test-app]
#
#   --hub HUB    registry and path the images are named under [default: localhost]
#   --tag TAG    [default: the crates' version, 0.1.0]
#   --test-app   also build HUB/mesh-test-app:TAG (busybox from Debian's busybox-static: httpd, nc,
#                sh), the application the container-runtime test runs (`cargo xtask pod-test`)
#
# Last run (2026-11-28, shared 2-core VM, cold cargo cache for the profile): binaries 13 min,
# debootstrap 1 min, images seconds; mesh-init 16.0 MB, mesh-proxy 7.8 MB, mesh-test-app 2.0 MB.
#
# Gives HUB/mesh-init:TAG and HUB/mesh-proxy:TAG, fully qualified, as `mesh-init inject --hub HUB
# --tag TAG` refers to them. Push them with `podman push`, or load them into kind with
# `podman save ... | kind load image-archive /dev/stdin`.
#
# Steps: install podman, debootstrap, runc and catatonit (the pods' infra process) when missing;
# build both binaries on the host with the `image` profile (release, stripped; the eBPF programs with the pinned nightly of
# rust-toolchain-nightly); debootstrap bookworm minbase (+ iptables, iproute2) once into
# ~/.cache/mesh-init/images and `podman import` it as localhost/mesh-base:bookworm; `podman build`
# both targets of the Dockerfile with no network. podman reads scripts/containers.conf (runc,
# ulimits, cgroupfs), never /etc/containers. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

hub=localhost
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' mesh-init/Cargo.toml | head -n1)
test_app=0
while [ $# -gt 0 ]; do
  case "$1" in
    --hub) hub=${2:?--hub needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --test-app) test_app=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "scripts/image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
hub=${hub%/}
case "$hub" in
  */*|localhost|*.*|*:*) ;;
  *) echo "scripts/image.sh: --hub $hub is not a registry host (a name without '.', ':' or '/' would be read as docker.io/library/... on a node)" >&2; exit 2 ;;
esac

log() { printf '[image] %s\n' "$*" >&2; }
export CONTAINERS_CONF=$PWD/scripts/containers.conf
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

missing=()
for cmd in podman debootstrap runc catatonit; do command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work=$(mktemp -d "/tmp/mesh-image-$$-XXXX")
trap 'rm -rf "$work"' EXIT

# --- the binaries ------------------------------------------------------------------------------
log "building mesh-init and mesh-proxy (profile image: release, stripped)"
cargo build --locked --profile image -p mesh-init -p mesh-proxy
mkdir -p "$work/context"
cp target/image/mesh-init target/image/mesh-proxy "$work/context/"

# --- the base ----------------------------------------------------------------------------------
cache=${XDG_CACHE_HOME:-$HOME/.cache}/mesh-init/images
mkdir -p "$cache"
base=localhost/mesh-base:bookworm
mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)\/* *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
if [ ! -s "$cache/bookworm-minbase.tar" ]; then
  log "debootstrap bookworm minbase from $mirror (about 30 s)"
  debootstrap --variant=minbase --include=iptables,iproute2 bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$work/rootfs" -cf "$cache/bookworm-minbase.tar.part" .
  mv "$cache/bookworm-minbase.tar.part" "$cache/bookworm-minbase.tar"
fi
if ! podman image exists "$base"; then
  log "importing the base as $base"
  podman import --quiet "$cache/bookworm-minbase.tar" "$base" >/dev/null
fi

# --- the images --------------------------------------------------------------------------------
# The build stages and the previous images of the same names become dangling images: remove
# those this run made, and no others (other users' builds share the store).
dangling_before=$(podman images --quiet --filter dangling=true | sort -u)
for target in mesh-init mesh-proxy; do
  log "building $hub/$target:$tag"
  podman build --quiet --pull=never --network=none --build-arg "BASE=$base" --target "$target" \
    -t "$hub/$target:$tag" -f Dockerfile "$work/context" >/dev/null
done

if [ "$test_app" = 1 ]; then
  # Static busybox from Debian's package: one binary that is httpd, wget, sh, sleep, ...
  if [ ! -s "$cache/busybox" ]; then
    log "fetching Debian's busybox-static"
    (cd "$work" && apt-get download busybox-static >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get download busybox-static >/dev/null; })
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
    cp "$work/bb/bin/busybox" "$cache/busybox"
  fi
  mkdir -p "$work/app/bin" "$work/app/www" "$work/app/tmp"
  cp "$cache/busybox" "$work/app/bin/busybox"
  # (Debian 12's static wget crashes on every request; nc is the client.)
  for applet in sh httpd nc sleep cat echo date kill mkdir; do ln -s busybox "$work/app/bin/$applet"; done
  log "building $hub/mesh-test-app:$tag"
  tar -C "$work/app" -c . | podman import --quiet --change 'ENTRYPOINT ["/bin/sh"]' - "$hub/mesh-test-app:$tag" >/dev/null
fi

for id in $(comm -13 <(echo "$dangling_before") <(podman images --quiet --filter dangling=true | sort -u)); do
  podman rmi "$id" >/dev/null 2>&1 || true
done

for target in mesh-init mesh-proxy $([ "$test_app" = 1 ] && echo mesh-test-app); do
  size=$(podman image inspect --format '{{.Size}}' "$hub/$target:$tag")
  printf '%s/%s:%s\t%s MB\n' "$hub" "$target" "$tag" "$(awk -v s="$size" 'BEGIN { printf "%.1f", s / 1e6 }')"
done

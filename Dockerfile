# syntax=docker/dockerfile:1
#
# Two images from one build:
#   docker build --target mesh-init  -t mesh-init:0.1.0  .
#   docker build --target mesh-proxy -t mesh-proxy:0.1.0 .
# (the tags `mesh-init inject` writes by default; see deploy/README.md). Built with the `ebpf`
# feature, so one mesh-init image serves both modes.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

# ---------------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN} AS build
# The eBPF programs are built by mesh-init/build.rs with `cargo +nightly -Z build-std` and linked
# by bpf-linker, which must use nightly's own LLVM (Debian has no LLVM of that major): the
# recipe of scripts/setup.sh and shared/EBPF-TOOLCHAIN.md. `nightly` is not pinned here, as it is
# not there; pin both together if builds must be reproducible.
RUN rustup toolchain install nightly --profile minimal --component rust-src
RUN set -eu; \
    sysroot=$(rustc +nightly --print sysroot); \
    major=$(rustc +nightly -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p'); \
    prefix=/opt/llvm-$major; \
    mkdir -p "$prefix/lib"; \
    for f in "$sysroot"/lib/libLLVM*; do ln -sf "$f" "$prefix/lib/"; done; \
    ln -sf "$sysroot"/lib/libLLVM.so.*-rust-* "$prefix/lib/libLLVM.so"; \
    LLVM_PREFIX="$prefix" cargo install --locked bpf-linker --version 0.13.0 \
        --no-default-features --features "llvm-$major"; \
    bpf-linker --version

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p mesh-init -p mesh-proxy \
 && mkdir -p /out \
 && cp target/release/mesh-init target/release/mesh-proxy /out/

# ---------------------------------------------------------------------------------------------
# The init container: runs once as root with NET_ADMIN/NET_RAW (iptables mode) or BPF/NET_ADMIN
# (eBPF mode). Debian's `iptables` package carries both backends (iptables-legacy and
# iptables-nft, xtables-*-multi); mesh-init picks the one the node's rules already use.
# iproute2 is for debugging a pod's interception (`ip rule`, `ss`), findutils is used by the
# eBPF mode's cgroup lookup (it is in the base image already; listed so it stays).
FROM debian:${DEBIAN}-slim AS mesh-init
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables iproute2 findutils \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/mesh-init /usr/local/bin/mesh-init
ENTRYPOINT ["/usr/local/bin/mesh-init"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# The sidecar: UID/GID 1337, the owner the capture rules exempt. No capabilities needed.
FROM debian:${DEBIAN}-slim AS mesh-proxy
RUN groupadd --gid 1337 mesh-proxy \
 && useradd --uid 1337 --gid 1337 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mesh-proxy
COPY --from=build /out/mesh-proxy /usr/local/bin/mesh-proxy
USER 1337:1337
EXPOSE 15090
ENTRYPOINT ["/usr/local/bin/mesh-proxy"]
CMD ["--config", "/etc/mesh-proxy/config.yaml"]

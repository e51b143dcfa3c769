# The two images, from binaries built on the host. Use scripts/image.sh, which builds the
# binaries (stripped, profile `image`), makes the Debian base with debootstrap (nothing comes from
# Docker Hub), and runs
#
#   podman build --pull=never --network=none --build-arg BASE=<base> --target mesh-init  -t <hub>/mesh-init:<tag>  -f Dockerfile <context>
#   podman build --pull=never --network=none --build-arg BASE=<base> --target mesh-proxy -t <hub>/mesh-proxy:<tag> -f Dockerfile <context>
#
# where <context> holds only `mesh-init` and `mesh-proxy` (the repository, with its target/, is
# never sent to the builder). Both binaries are built on the host rather than in a build stage:
# a Rust toolchain image would have to come from a registry, and an in-image build of the eBPF
# programs (pinned nightly, bpf-linker against its LLVM) takes minutes that the host's cargo cache
# saves. No stage needs the network.

# A Debian bookworm minbase with iptables and iproute2, made by debootstrap and `podman import`.
ARG BASE=localhost/mesh-base:bookworm

# ---------------------------------------------------------------------------------------------
# The init container's tree, distroless-style: only what mesh-init runs, with the shared libraries
# each of them loads. iptables with both the legacy and nf_tables backends (mesh-init follows
# whichever the node uses; the xtables match and target modules are loaded at run time, so all
# of them come along), iproute2's `ip` (the loopback ::6 address, debugging), and a shell with
# find and tr for the eBPF mode's cgroup lookup. The merged-/usr layout of Debian 12 is kept.
FROM ${BASE} AS init-tree
COPY mesh-init /usr/local/bin/mesh-init
RUN set -eu; out=/out; mkdir -p $out/usr/bin $out/usr/sbin $out/usr/lib $out/usr/lib64 $out/etc $out/run/xtables $out/tmp; \
    chmod 1777 $out/tmp; for d in bin sbin lib lib64; do ln -s usr/$d $out/$d; done; \
    tools="/usr/bin/dash /usr/bin/find /usr/bin/tr /usr/bin/ip /usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi"; \
    modules=$(ls /usr/lib/x86_64-linux-gnu/xtables/*.so); \
    for f in /usr/bin/sh /usr/sbin/iptables* /usr/sbin/ip6tables* /etc/alternatives/iptables* /etc/alternatives/ip6tables* \
             $tools $modules /etc/iproute2 /etc/nsswitch.conf /etc/protocols /etc/ethertypes; do \
      [ -e "$f" ] || [ -L "$f" ] || continue; cp -a --parents "$f" $out/; done; \
    for elf in /usr/local/bin/mesh-init $tools $modules; do \
      for lib in $(ldd "$elf" | grep -o '/[^ ]*'); do cp -L --parents "$lib" $out/ 2>/dev/null || cp -L "$lib" "$out$lib"; done; done; \
    printf 'root:x:0:0:root:/root:/bin/sh\n' > $out/etc/passwd; printf 'root:x:0:\n' > $out/etc/group

FROM scratch AS mesh-init
COPY --from=init-tree /out /
COPY mesh-init /usr/local/bin/mesh-init
ENTRYPOINT ["/usr/local/bin/mesh-init"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------
# The sidecar's tree, distroless-style: the binary's shared libraries (as its dynamic loader
# resolves them) and a passwd/group naming UID/GID 1337. No shell, no package manager.
FROM ${BASE} AS proxy-tree
COPY mesh-proxy /usr/local/bin/mesh-proxy
RUN set -eu; mkdir -p /out/etc /out/tmp; chmod 1777 /out/tmp; \
    for lib in $(ldd /usr/local/bin/mesh-proxy | grep -o '/[^ ]*'); do cp --parents -L "$lib" /out/; done; \
    echo 'root:x:0:0:root:/root:/sbin/nologin' > /out/etc/passwd; \
    echo 'mesh-proxy:x:1337:1337:mesh-proxy:/nonexistent:/sbin/nologin' >> /out/etc/passwd; \
    printf 'root:x:0:\nmesh-proxy:x:1337:\n' > /out/etc/group; \
    cp /etc/nsswitch.conf /out/etc/

# UID/GID 1337: the owner whose traffic the capture rules exempt. No capabilities needed.
FROM scratch AS mesh-proxy
COPY --from=proxy-tree /out /
COPY mesh-proxy /usr/local/bin/mesh-proxy
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/mesh-proxy"]
CMD ["--config", "/etc/mesh-proxy/config.yaml"]

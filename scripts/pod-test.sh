#!/usr/bin/env bash
# The container-runtime test: builds the images (scripts/image.sh --test-app) and runs the
# injected pods as real podman pods (tests/tests/containers.rs, injected_pods_in_podman): the
# init container with exactly the injected user and capabilities, the validation step, the
# sidecar as 1337 with a read-only root, an application calling another pod through both proxies,
# the kubelet's probes, and a rollout with SIGTERM while the client keeps calling.
#
#   sudo scripts/pod-test.sh            about 15 minutes from a cold cargo cache, 1 minute warm
#
# Too slow for CI (the release build of the images); CI runs the same scenario with the
# containers as processes (injected_pods_as_processes_roll_out_without_failures). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"

mesh_reap_stale
trap 'mesh_reap_stale' EXIT
bash scripts/image.sh --test-app
cargo build --locked --bins
CI=true cargo test --locked -p mesh-e2e --test containers -- --ignored injected_pods_in_podman --nocapture 2>&1 \
  | tee /dev/stderr | grep -E '^pod-test:|test result'

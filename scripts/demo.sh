#!/usr/bin/env bash
# The BookInfo walk-through on one machine, in network namespaces.
#
#   sudo scripts/demo.sh [--mode iptables|ebpf] [--control pilot|file] [--short] [--requests N] [--no-build]
#
# productpage (with a sidecar: mesh-init rules + mesh-proxy as UID 1337) calls reviews and
# ratings by name; reviews runs as v1, v2 and v3; ratings is called by v2 and v3. Each service
# has its own namespace and address on a bridge that lives in a namespace of its own: nothing is
# connected to the machine's namespace. The walk-through then routes (a) all reviews traffic to
# v1, (b) 50/50 to v1 and v3, (c) requests of end-user jason to v2, and shows the observed
# versions and the proxy's /config_dump at each step. --short is the test mode: fewer requests,
# and the distributions are asserted (exit 1 when one is off).
# --control pilot (the default): mesh-pilot serves the proxy, from Kubernetes-format platform
# objects and Istio's own rule files (VirtualService, DestinationRule) applied step by step as
# `kubectl apply` would; the proxy is started as `mesh-init inject --discovery-address` starts it,
# and `mesh-pilot status` is shown at each step. --control file: the proxy's own config file is
# edited instead (no control plane).
#
# Ctrl-C or any failure removes every namespace, rule, program and process it created.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
source scripts/lib.sh

mode=iptables control=pilot short=0 requests=400 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --mode) mode=$2; shift 2 ;;
    --control) control=$2; shift 2 ;;
    --short) short=1; requests=200; shift ;;
    --requests) requests=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$mode" in iptables|ebpf) ;; *) echo "demo.sh: --mode must be iptables or ebpf, not $mode" >&2; exit 2 ;; esac
case "$control" in pilot|file) ;; *) echo "demo.sh: --control must be pilot or file, not $control" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "demo.sh: needs root for network namespaces: sudo $0 $*" >&2; exit 1; }

export PATH="$HOME/.cargo/bin:$PATH:/usr/sbin:/sbin"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [ "$build" = 1 ]; then
  if [ "$mode" = ebpf ]; then bash scripts/setup.sh; else bash scripts/setup.sh --no-ebpf; fi
  features=(); [ "$mode" = ebpf ] || features=(--no-default-features)
  pilot=(); [ "$control" = file ] || pilot=(-p mesh-pilot)
  say "building mesh-init, mesh-proxy${pilot:+ and mesh-pilot} (release)"
  cargo build --release --locked -p mesh-init "${features[@]}" -p mesh-proxy "${pilot[@]}"
fi
bin=${MESH_BIN_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}
for b in mesh-init mesh-proxy $([ "$control" = file ] || echo mesh-pilot); do
  [ -x "$bin/$b" ] || { echo "demo.sh: no $b in $bin (drop --no-build)" >&2; exit 1; }
done

# --- names and clean-up ------------------------------------------------------------------------
id=$$
ns() { echo "mesh-demo-$id-$1"; }
fabric=$(ns net)
services=(pp r1 r2 r3 rt)
declare -A addr=([pp]=10.200.1.10 [r1]=10.200.1.11 [r2]=10.200.1.12 [r3]=10.200.1.13 [rt]=10.200.1.20)
work=$(mktemp -d /tmp/mesh-demo.XXXXXX); chmod 755 "$work"
cg_root=$(awk '/ - cgroup2 / {print $5; exit}' /proc/self/mountinfo)
cgroup="$cg_root/mesh-demo-$id-pod"

cleanup() {
  local status=$?
  set +e
  if [ "$status" != 0 ] && [ -d "$work" ]; then
    for log in "$work"/*.log; do echo "--- last lines of $(basename "$log")"; tail -n 15 "$log"; done
  fi
  if [ "$mode" = ebpf ] && [ -d "$cgroup" ]; then
    "$bin/mesh-init" ebpf --cgroup "$cgroup" --netns "$(ns pp)" --cleanup-only >/dev/null 2>&1
  fi
  for s in "${services[@]}" net; do
    for p in $(ip netns pids "$(ns "$s")" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$(ns "$s")" 2>/dev/null
    rm -rf "/etc/netns/$(ns "$s")"
  done
  if [ -d "$cgroup" ]; then
    for p in $(cat "$cgroup/cgroup.procs" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    sleep 0.2; rmdir "$cgroup" 2>/dev/null
  fi
  rm -rf "$work"
}
bpffs_was_mounted=$(mountpoint -q /sys/fs/bpf && echo 1 || echo 0)
trap 'cleanup; mesh_unmount_bpffs_if_ours "$bpffs_was_mounted"' EXIT
trap 'exit 130' INT TERM
mesh_reap_stale

# --- the network -------------------------------------------------------------------------------
say "creating namespaces: productpage, reviews v1/v2/v3, ratings, and a bridge namespace"
ip netns add "$fabric"
ip -n "$fabric" link set lo up
ip -n "$fabric" link add br0 type bridge
ip -n "$fabric" addr add 10.200.1.1/24 dev br0
ip -n "$fabric" link set br0 up
for s in "${services[@]}"; do
  n=$(ns "$s")
  ip netns add "$n"
  ip -n "$n" link set lo up
  ip -n "$fabric" link add "v-$s" type veth peer name eth0 netns "$n"
  ip -n "$fabric" link set "v-$s" master br0 up
  ip -n "$n" addr add "${addr[$s]}/24" dev eth0
  ip -n "$n" link set eth0 up
  ip -n "$n" route add default via 10.200.1.1
  mkdir -p "/etc/netns/$n"
done
# productpage knows reviews and ratings only by name. Their addresses are virtual: they exist
# only as routes in its sidecar, like a Kubernetes Service's ClusterIP.
printf '127.0.0.1 localhost\n10.200.100.1 reviews\n10.200.100.2 ratings\n' > "/etc/netns/$(ns pp)/hosts"
for s in r1 r2 r3; do printf '127.0.0.1 localhost\n%s ratings\n' "${addr[rt]}" > "/etc/netns/$(ns "$s")/hosts"; done

start() { # start NS LOGNAME CMD...: runs CMD in NS (with its /etc/netns hosts), logs to the work dir
  local n=$1 log=$2; shift 2
  ip netns exec "$n" "$@" >"$work/$log.log" 2>&1 &
  disown   # killed by cleanup(); no "Killed" job notices
}
wait_ready() { # wait_ready LOGNAME MARKER
  for _ in $(seq 300); do grep -q "$2" "$work/$1.log" 2>/dev/null && return 0; sleep 0.1; done
  echo "demo.sh: $1 did not start:"; cat "$work/$1.log"; exit 1
}

say "starting reviews v1, v2, v3 and ratings (plain python http.server programs, no sidecar)"
start "$(ns rt)" ratings python3 scripts/bookinfo/app.py ratings
start "$(ns r1)" reviews-v1 python3 scripts/bookinfo/app.py reviews v1
start "$(ns r2)" reviews-v2 python3 scripts/bookinfo/app.py reviews v2
start "$(ns r3)" reviews-v3 python3 scripts/bookinfo/app.py reviews v3
for l in ratings reviews-v1 reviews-v2 reviews-v3; do wait_ready "$l" ready; done

# --- --control file: the proxy's own configuration, edited at each step -------------------------
write_config() { # write_config RULES_YAML: the reviews route's rules, the rest fixed
  cat > "$work/proxy.yaml.tmp" <<YAML
admin: { address: 127.0.0.1:15090 }
outbound_policy: allow_any
listeners:
  - name: virtual
    address: 0.0.0.0:15000
routes:
  - name: reviews
    destinations: ["reviews:9080", "10.200.100.1:9080"]
    protocol: http
    rules:
$1
  - name: ratings
    destinations: ["ratings:9080", "10.200.100.2:9080"]
    protocol: http
    rules:
      - clusters: [{ name: ratings, weight: 100 }]
clusters:
  - { name: reviews-v1, lb_policy: round_robin, connect_timeout: 1s }
  - { name: reviews-v2, lb_policy: round_robin, connect_timeout: 1s }
  - { name: reviews-v3, lb_policy: round_robin, connect_timeout: 1s }
  - { name: ratings, lb_policy: round_robin, connect_timeout: 1s }
endpoints:
  - { cluster: reviews-v1, addresses: ["${addr[r1]}:9080"] }
  - { cluster: reviews-v2, addresses: ["${addr[r2]}:9080"] }
  - { cluster: reviews-v3, addresses: ["${addr[r3]}:9080"] }
  - { cluster: ratings, addresses: ["${addr[rt]}:9080"] }
YAML
  chmod 644 "$work/proxy.yaml.tmp"
  mv "$work/proxy.yaml.tmp" "$work/proxy.yaml"   # atomic: the proxy never reads half a file
}

all_v1='      - clusters: [{ name: reviews-v1, weight: 100 }]'
half_v1_v3='      - clusters: [{ name: reviews-v1, weight: 50 }, { name: reviews-v3, weight: 50 }]'
jason_v2='      - match: { headers: { end-user: jason } }
        clusters: [{ name: reviews-v2, weight: 100 }]
'"$half_v1_v3"

# --- --control pilot: what Kubernetes would hold, and Istio's rule files -------------------------
platform() { # the Services and Pods, as `kubectl get -o yaml` lists them (no EndpointSlices:
             # mesh-pilot then takes the ready Pods each Service selects, as the controller would)
  pod() { printf -- '- {apiVersion: v1, kind: Pod, metadata: {name: %s, namespace: default, labels: {app: %s, version: %s}}, spec: {containers: [{name: %s, image: %s}]}, status: {phase: Running, podIP: %s}}\n' "$1" "$2" "$3" "$2" "$2" "$4"; }
  cat <<YAML
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Service, metadata: {name: reviews, namespace: default}, spec: {clusterIP: 10.200.100.1, ports: [{name: http, port: 9080}], selector: {app: reviews}}}
- {apiVersion: v1, kind: Service, metadata: {name: ratings, namespace: default}, spec: {clusterIP: 10.200.100.2, ports: [{name: http, port: 9080}], selector: {app: ratings}}}
- {apiVersion: v1, kind: Service, metadata: {name: productpage, namespace: default}, spec: {clusterIP: 10.200.100.4, ports: [{name: http, port: 9080}], selector: {app: productpage}}}
YAML
  pod productpage-v1-0 productpage v1 "${addr[pp]}"
  pod reviews-v1-0 reviews v1 "${addr[r1]}"
  pod reviews-v2-0 reviews v2 "${addr[r2]}"
  pod reviews-v3-0 reviews v3 "${addr[r3]}"
  pod ratings-v1-0 ratings v1 "${addr[rt]}"
}
pilot_dir=$work/mesh-pilot
istio_rules=$repo/mesh-pilot/tests/testdata/bookinfo/rules
apply() { # apply FILE: each object in FILE replaces the one of the same kind and name, as
          # `kubectl apply -f FILE` does; one file per object, each written atomically
  echo "  applying $(basename "$1")"
  python3 - "$1" "$pilot_dir" <<'PY'
import os, sys, yaml
src, dst = sys.argv[1], sys.argv[2]
for doc in yaml.safe_load_all(open(src)):
    if doc:
        name = f"{doc['kind']}-{doc['metadata']['name']}.yaml".lower()
        with open(os.path.join(dst, "." + name), "w") as f:
            yaml.safe_dump(doc, f)
        os.rename(os.path.join(dst, "." + name), os.path.join(dst, name))
PY
}
pilot_status() { ip netns exec "$fabric" "$bin/mesh-pilot" status | sed 's/^/  /'; }
if [ "$control" = pilot ]; then
  say "mesh-pilot on the bridge: Services and Pods, Istio's destination-rule-all.yaml and virtual-service-all-v1.yaml"
  mkdir "$pilot_dir"
  platform > "$pilot_dir/platform.yaml"
  apply "$istio_rules/destination-rule-all.yaml"
  apply "$istio_rules/virtual-service-all-v1.yaml"
  start "$fabric" mesh-pilot "$bin/mesh-pilot" serve --config-dir "$pilot_dir" --listen 10.200.1.1:15010
  wait_ready mesh-pilot "discovery on"
fi

# --- productpage and its sidecar ---------------------------------------------------------------
pp=$(ns pp)
if [ "$mode" = ebpf ]; then
  mkdir "$cgroup"
  # Processes join the pod's cgroup before entering the namespace (ip netns exec hides cgroup2).
  start() { local n=$1 log=$2; shift 2; (echo $BASHPID > "$cgroup/cgroup.procs"; exec ip netns exec "$n" "$@") >"$work/$log.log" 2>&1 & disown; }
  say "mesh-init ebpf: attaching the redirector to the pod's cgroup"
  "$bin/mesh-init" ebpf --cgroup "$cgroup" --netns "$pp" -p 15000 -u 1337
else
  say "mesh-init iptables: writing the interception rules in productpage's namespace"
  "$bin/mesh-init" iptables --netns "$pp" -p 15000 -z 15000 -i '*' -b '*' -u 1337 -d 15090
  ip netns exec "$pp" iptables-save -t nat | grep -E '^-A (PREROUTING|OUTPUT|ISTIO)' | sed 's/^/  /'
fi
proxy=(setpriv --reuid=1337 --regid=1337 --clear-groups -- "$bin/mesh-proxy" --config "$work/proxy.yaml" --workers 1)
if [ "$control" = pilot ]; then
  # As an injected sidecar runs: its file holds only the bootstrap; the listeners, routes,
  # clusters and endpoints come from mesh-pilot's scope for the pod's namespace.
  echo 'admin: { address: 127.0.0.1:15090 }' > "$work/proxy.yaml"; chmod 644 "$work/proxy.yaml"
  start "$pp" mesh-proxy env MESH_PROXY_DISCOVERY_ADDRESS=10.200.1.1:15010 POD_NAMESPACE=default \
    POD_NAME=productpage-v1-0 "${proxy[@]}"
  route=reviews.default.svc.cluster.local:9080
else
  write_config "$all_v1"
  start "$pp" mesh-proxy "${proxy[@]}"
  route=reviews
fi
start "$pp" productpage python3 scripts/bookinfo/app.py productpage
wait_ready productpage ready
for _ in $(seq 100); do ip netns exec "$pp" curl -sf -o /dev/null http://127.0.0.1:15090/ready && break; sleep 0.1; done

config_dump() { # the reviews route and the endpoints of its clusters, from the admin port
  ip netns exec "$pp" curl -s http://127.0.0.1:15090/config_dump | python3 scripts/bookinfo/show_config.py "$route"
}
wait_version() { # wait_version TEXT: until the reviews route the proxy applied shows TEXT
  for _ in $(seq 100); do
    config_dump 2>/dev/null | grep -q -- "$1" && return 0
    sleep 0.05
  done
  echo "demo.sh: the proxy did not apply the new config:"; ip netns exec "$pp" curl -s http://127.0.0.1:15090/config_dump | head -c 2000; exit 1
}
show() { config_dump; if [ "$control" = pilot ]; then echo "  mesh-pilot status:"; pilot_status; fi; }
user() { # user ARGS...: the end user, in the bridge namespace, calling productpage
  ip netns exec "$fabric" python3 scripts/bookinfo/client.py "${addr[pp]}:9080" "$requests" "$@"
}
expect() { [ "$short" = 1 ] && echo "--expect=$1" || echo "--expect="; }

say "(a) all reviews traffic to v1 — $requests requests"
if [ "$control" = pilot ]; then wait_version "v1|reviews"; fi
user "$(expect v1=1:1)"
show

if [ "$control" = pilot ]; then
  say "(b) reviews 50/50 between v1 and v3: applying Istio's virtual-service-reviews-50-v3.yaml"
  apply "$istio_rules/virtual-service-reviews-50-v3.yaml"
  wait_version "v3|reviews"
else
  say "(b) reviews 50/50 between v1 and v3: editing the proxy's config file (no restart)"
  write_config "$half_v1_v3"
  wait_version reviews-v3
fi
user "$(expect v1=0.35:0.65,v3=0.35:0.65)"
show

if [ "$control" = pilot ]; then
  say "(c) requests of end-user jason to v2, everyone else to v3: applying virtual-service-reviews-jason-v2-v3.yaml"
  apply "$istio_rules/virtual-service-reviews-jason-v2-v3.yaml"
  others=v3=1:1
else
  say "(c) requests of end-user jason to v2, everyone else still 50/50"
  write_config "$jason_v2"
  others=v1=0.35:0.65,v3=0.35:0.65
fi
wait_version jason
echo "  as jason:"; user --header "end-user: jason" "$(expect v2=1:1)"
echo "  as anyone else:"; user "$(expect "$others")"
show

say "done: removing namespaces, rules and processes"

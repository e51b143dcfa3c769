#!/usr/bin/env python3
"""Prints the part of mesh-proxy's /config_dump (JSON on stdin) that the walk-through is about:
the config's version and source, the rules of ROUTE, and the endpoints of the clusters they name.

    curl -s 127.0.0.1:15090/config_dump | show_config.py reviews
"""
import json, sys

route_name = sys.argv[1]
dump = json.load(sys.stdin)
cfg = dump["config"]
print(f"  config version {dump['version']} from {dump['source']}")
wanted = set()
for route in cfg.get("routes", []):
    if route["name"] != route_name:
        continue
    dests = [d if isinstance(d, str) else json.dumps(d, sort_keys=True) for d in route.get("destinations", [])]
    print(f"  route {route_name}: destinations {', '.join(dests)}")
    for rule in route.get("rules", []):
        match = rule.get("match") or {}
        shown = json.dumps(match, sort_keys=True) if match else "(everything)"
        clusters = ", ".join(f"{c['name']} weight {c['weight']}" for c in rule["clusters"])
        wanted.update(c["name"] for c in rule["clusters"])
        print(f"    match {shown} -> {clusters}")
for ep in cfg.get("endpoints", []):
    if ep["cluster"] in wanted:
        print(f"  endpoints {ep['cluster']}: {', '.join(map(str, ep['addresses']))}")

#!/usr/bin/env python3
"""Sends N requests to productpage on one keep-alive connection and tallies which reviews
version answered. Prints a table; with --expect, exits 1 when a share is outside its bounds.

    client.py HOST:PORT N [--header 'end-user: jason'] [--expect v1=0.4:0.6,v3=0.4:0.6]
"""
import argparse, collections, http.client, json, sys

p = argparse.ArgumentParser()
p.add_argument("addr")
p.add_argument("n", type=int)
p.add_argument("--header", action="append", default=[])
p.add_argument("--expect", default="")
a = p.parse_args()

host, port = a.addr.rsplit(":", 1)
headers = dict(h.split(": ", 1) for h in a.header)
conn = http.client.HTTPConnection(host, int(port), timeout=5)
seen = collections.Counter()
for _ in range(a.n):
    try:
        conn.request("GET", "/productpage", headers=headers)
        r = conn.getresponse()
        body = json.loads(r.read())
        seen[body["reviews"].get("version", f"HTTP {r.status}") if r.status == 200 else f"HTTP {r.status}"] += 1
    except Exception as e:
        seen[f"error: {type(e).__name__}"] += 1
        conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=5)

print(f"  {'version':<18}{'requests':>9}{'share':>8}")
for version, count in sorted(seen.items()):
    print(f"  {version:<18}{count:>9}{count / a.n:>8.1%}")

failed = []
for item in filter(None, a.expect.split(",")):
    version, bounds = item.split("=")
    lo, hi = map(float, bounds.split(":"))
    share = seen[version] / a.n
    if not lo <= share <= hi:
        failed.append(f"{version}: {share:.1%} not in [{lo:.0%}, {hi:.0%}]")
unexpected = set(seen) - {i.split("=")[0] for i in filter(None, a.expect.split(","))}
if a.expect and unexpected:
    failed.append(f"unexpected answers: {sorted(unexpected)}")
if failed:
    print("  FAILED: " + "; ".join(failed))
    sys.exit(1)

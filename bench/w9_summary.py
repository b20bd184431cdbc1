#!/usr/bin/env python3
"""Summarises bench/w9.sh results: per system and broker, the median
(min-max) of messages/s completed at the sink, publishing rate, peak RSS,
and whether every message arrived exactly once; then plumb-mqtt vs
Node-RED-mqtt."""
import json
import statistics
import sys


def main(path):
    runs = {}
    header = None
    for line in open(path):
        d = json.loads(line)
        if "system" not in d:
            header = d
            continue
        s = d["sink"]
        last = s.get("last_ts")
        elapsed = (last - d["t0"]) if last else None
        rate = d["messages"] / elapsed if elapsed else 0.0
        ok = s.get("unique") == d["messages"]
        runs.setdefault((d["system"], d["broker"]), []).append(
            {"rate": rate, "pub": d["publish"]["per_s"], "rss": d.get("peak_rss_mib"), "ok": ok,
             "dups": s.get("duplicate_deliveries", 0), "unique": s.get("unique")})
    if header:
        print(f"W9 on {header['machine']}; {header['plumb']}; {header['messages']} messages per run, prefetch {header['prefetch']}")
    fmt = lambda xs: f"{statistics.median(xs):,.0f} ({min(xs):,.0f}-{max(xs):,.0f})"
    print(f"{'system':10} {'broker':6} {'completed msg/s':>24} {'published msg/s':>24} {'peak RSS MiB':>14}  all once")
    med = {}
    for (system, broker), rs in sorted(runs.items()):
        rates = [r["rate"] for r in rs]
        med[(system, broker)] = statistics.median(rates)
        rss = [r["rss"] for r in rs if r["rss"] is not None]
        print(f"{system:10} {broker:6} {fmt(rates):>24} {fmt([r['pub'] for r in rs]):>24} "
              f"{(statistics.median(rss) if rss else float('nan')):>14.1f}  "
              f"{all(r['ok'] for r in rs)} (dups {sum(r['dups'] for r in rs)}, unique {[r['unique'] for r in rs]})")
    if ("plumb", "mqtt") in med and ("node-red", "mqtt") in med and med[("node-red", "mqtt")]:
        print(f"MQTT: plumb / Node-RED = {med[('plumb', 'mqtt')] / med[('node-red', 'mqtt')]:.2f}x (medians)")


if __name__ == "__main__":
    main(sys.argv[1])

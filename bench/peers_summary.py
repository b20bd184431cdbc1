#!/usr/bin/env python3
"""Medians (min-max) of several `bench/webhooks.sh all` result files:
plumb, Node-RED and n8n side by side, and plumb's ratio to each.

    bench/peers_summary.py bench/results/webhooks-*-peers-*.jsonl
"""
import json
import statistics
import sys
from collections import defaultdict


def completed(row):
    if row["system"] != "plumb":
        return row["wrk"]["rps"]
    sink = row["sink"]
    span = (sink["last_ts"] or 0) - (sink["first_ts"] or 0)
    return sink["unique"] / span if span > 0 else 0.0


def med(xs):
    xs = sorted(xs)
    return statistics.median(xs), xs[0], xs[-1], len(xs)


def main(paths):
    w6 = defaultdict(list)    # (system, c) -> completed/s
    p99 = defaultdict(list)   # (system, c) -> sender p99 ms
    dups = defaultdict(int)
    w5 = defaultdict(list)    # (system, figure) -> value
    w1 = defaultdict(list)    # (load, figure) -> value (plumb only)
    for path in paths:
        for line in open(path):
            if not line.strip():
                continue
            r = json.loads(line)
            if r["bench"] == "W6":
                key = (r["system"], r["c"])
                w6[key].append(completed(r))
                p99[key].append(r["wrk"]["p99_ms"])
                dups[r["system"]] += r["sink"]["duplicate_deliveries"]
            elif r["bench"] == "W1":
                load = f"{r['target_rps']:>6}/s offered"
                w1[(load, "achieved/s")].append(r["rps"])
                w1[(load, "p50 ms")].append(r["p50_ms"])
                w1[(load, "p99 ms")].append(r["p99_ms"])
            elif r["bench"] == "W1max":
                wrk = r["wrk"]
                w1[("closed loop c=64", "achieved/s")].append(wrk["rps"])
                w1[("closed loop c=64", "p50 ms")].append(wrk["p50_ms"])
                w1[("closed loop c=64", "p99 ms")].append(wrk["p99_ms"])
            elif r["bench"] == "W5":
                start = r.get("start_to_ready_ms", r.get("start_to_first_200_ms"))
                w5[(r["system"], "start (ms)")].append(start)
                w5[(r["system"], "idle RSS (MiB)")].append(float(r["idle_rss_mib"]))
    systems = ["plumb", "node-red", "n8n"]
    print(f"W6 completed/s, median (min-max) over {len(paths)} rounds")
    for c in sorted({c for (_, c) in w6}):
        cells = []
        meds = {}
        for s in systems:
            if (s, c) in w6:
                m, lo, hi, n = med(w6[(s, c)])
                meds[s] = m
                cells.append(f"{s} {m:,.0f} ({lo:,.0f}-{hi:,.0f})")
        ratios = [
            f"plumb/{s} {meds['plumb'] / meds[s]:.2f}x"
            for s in systems[1:]
            if s in meds and "plumb" in meds and meds[s] > 0
        ]
        print(f"  c={c:<3} " + " | ".join(cells) + "   " + ", ".join(ratios))
    print("W6 sender p99 ms, median (min-max)")
    for c in sorted({c for (_, c) in p99}):
        cells = []
        for s in systems:
            if (s, c) in p99:
                m, lo, hi, _ = med(p99[(s, c)])
                cells.append(f"{s} {m:.2f} ({lo:.2f}-{hi:.2f})")
        print(f"  c={c:<3} " + " | ".join(cells))
    print("duplicate deliveries, all rounds: " + ", ".join(f"{s} {dups[s]}" for s in systems if s in dups))
    print("W1 (plumb), median (min-max)")
    for load in sorted({load for (load, _) in w1}):
        cells = []
        for fig in ["achieved/s", "p50 ms", "p99 ms"]:
            m, lo, hi, _ = med(w1[(load, fig)])
            cells.append(f"{fig} {m:,.1f} ({lo:,.1f}-{hi:,.1f})")
        print(f"  {load:<18} " + " | ".join(cells))
    print("W5")
    for (s, fig), xs in sorted(w5.items()):
        m, lo, hi, _ = med(xs)
        print(f"  {s:<9} {fig:<15} {m:,.1f} ({lo:,.1f}-{hi:,.1f})")


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env python3
"""Prints the tables of BENCHMARKS.md from a bench/webhooks.sh results file."""
import json
import sys


def main(path):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    print("\nW5 start and idle memory")
    for r in rows:
        if r["bench"] == "W5":
            start = r.get("start_to_ready_ms", r.get("start_to_first_200_ms"))
            print(f"  {r['system']:<9} start {start} ms   idle RSS {r['idle_rss_mib']} MiB")
    print("\nW1 webhook -> durable ack (plumb, SQLite FULL), hey c=64 at fixed rates")
    for r in rows:
        if r["bench"] == "W1":
            print(f"  target {r['target_rps']:>6}/s  got {r['rps']:>9}/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  codes {r['codes']}")
        if r["bench"] == "W1max":
            w = r["wrk"]
            print(f"  closed loop c=64: {w['rps']}/s  p50 {w['p50_ms']:.2f} ms  p99 {w['p99_ms']:.2f} ms  4xx/5xx {w['err_status']}")
    print("\nW6 webhook -> jq -> HTTP POST, end to end")
    print(f"  {'system':<9} {'c':>3} {'completed/s':>12} {'acks/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'delivered':>10} {'dups':>5}")
    for r in rows:
        if r["bench"] != "W6":
            continue
        w, s = r["wrk"], r["sink"]
        if r["system"] == "plumb":
            span = (s["last_ts"] or 0) - (s["first_ts"] or 0)
            completed = s["unique"] / span if span > 0 else 0
        else:
            completed = w["rps"]
        print(f"  {r['system']:<9} {r['c']:>3} {completed:>12.1f} {w['rps']:>9.1f} {w['p50_ms']:>8.2f} {w['p99_ms']:>8.2f} {s['unique']:>10} {s['duplicate_deliveries']:>5}")


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python3
"""Medians (with min-max) of an A/B run, per side.

Reads the log bench/ab.sh (sides `base` and `head`) or bench/w3.sh (sides
`sqlite` and `postgres`) wrote: step-overhead lines and the webhooks result
files of each round, as `<side> <round> results <file>`. Prints one line
per figure, the second side's median over the first's last:
    <figure>: base <median> (<min>-<max>)  head <median> (<min>-<max>)  head/base
"""
import json
import re
import statistics
import sys
from collections import defaultdict


def completed_per_s(row):
    sink = row["sink"]
    span = (sink["last_ts"] or 0) - (sink["first_ts"] or 0)
    return sink["unique"] / span if span > 0 else 0.0


def figures_of(path):
    """The figures of one webhooks result file: name -> value."""
    out = {}
    for line in open(path):
        if not line.strip():
            continue
        r = json.loads(line)
        if r["bench"] == "W5":
            out["W5 start to ready (ms)"] = r.get("start_to_ready_ms")
            out["W5 idle RSS (MiB)"] = float(r["idle_rss_mib"])
        elif r["bench"] == "W1":
            t = r["target_rps"]
            out[f"W1 {t}/s achieved (/s)"] = r["rps"]
            out[f"W1 {t}/s p99 (ms)"] = r["p99_ms"]
        elif r["bench"] == "W1max":
            out["W1 closed loop c=64 (/s)"] = r["wrk"]["rps"]
            out["W1 closed loop c=64 p99 (ms)"] = r["wrk"]["p99_ms"]
        elif r["bench"] == "W6":
            c = r["c"]
            out[f"W6 c={c} completed (/s)"] = completed_per_s(r)
            out[f"W6 c={c} ack p99 (ms)"] = r["wrk"]["p99_ms"]
            out[f"W6 c={c} duplicates"] = r["sink"]["duplicate_deliveries"]
    return out


def main(log):
    values = defaultdict(lambda: defaultdict(list))  # figure -> side -> [values]
    order = []
    sides = []
    for line in open(log):
        m = re.match(r"^(\w+) (\d+) (?:jq step|results)", line)
        if m and m.group(1) not in sides:
            sides.append(m.group(1))
        m = re.match(r"^(\w+) (\d+) jq step end to end \(run mean / 40\): ([\d.]+) ms", line)
        if m:
            name = "step overhead, jq step end to end (ms)"
            values[name][m.group(1)].append(float(m.group(3)))
            if name not in order:
                order.append(name)
            continue
        m = re.match(r"^(\w+) (\d+) results (\S+)", line)
        if m:
            for name, v in figures_of(m.group(3)).items():
                if v is None:
                    continue
                values[name][m.group(1)].append(float(v))
                if name not in order:
                    order.append(name)
    if len(sides) != 2:
        sys.exit(f"expected two sides in {log}, found {sides}")
    first, second = sides
    print(f"\nmedian (min-max) over the rounds; {second}/{first} is the ratio of medians")
    for name in order:
        cells = []
        med = {}
        for side in sides:
            xs = sorted(values[name][side])
            if not xs:
                cells.append(f"{side} -")
                continue
            med[side] = statistics.median(xs)
            cells.append(f"{side} {med[side]:.3g} ({xs[0]:.3g}-{xs[-1]:.3g}, n={len(xs)})")
        ratio = ""
        if med.get(first) and second in med:
            ratio = f"  {second}/{first} {med[second] / med[first]:.2f}"
        print(f"{name:<36} {'  '.join(cells)}{ratio}")


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env bash
# A/B: this checkout against an earlier commit, alternating, on one machine:
#   bench/ab.sh BASE_REV [ROUNDS]        (default ROUNDS=3)
#
# Builds BASE_REV in a git worktree (its own target dir), then runs, ROUNDS
# times, alternately base then head: the step-overhead benchmark and
# `bench/webhooks.sh plumb` (W5, W1, W6). Prints the median of each figure
# with its min–max per side (bench/ab_summary.py). The machine is shared
# and noisy: alternating rounds spread the noise over both sides, and the
# medians are what BENCHMARKS.md reports. Results:
# bench/results/webhooks-<time>-ab-{base,head}-<round>.jsonl and
# bench/results/ab-<time>.txt.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BASE=${1:?usage: bench/ab.sh BASE_REV [ROUNDS]}
ROUNDS=${2:-3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
WT=${AB_WORKTREE:-/tmp/plumb-ab-base}
TGT=${AB_TARGET:-/tmp/plumb-ab-base-target}
LOG=$ROOT/bench/results/ab-$STAMP.txt
mkdir -p "$ROOT/bench/results"

if [ ! -d "$WT" ]; then git -C "$ROOT" worktree add --detach "$WT" "$BASE" >&2; fi
git -C "$WT" checkout -q --detach "$BASE"
echo "building base $(git -C "$WT" rev-parse --short HEAD) and head $(git -C "$ROOT" rev-parse --short HEAD)" >&2
CARGO_TARGET_DIR=$TGT cargo build --release -q -p plumb-cli -p plumb-bench --manifest-path "$WT/Cargo.toml"
cargo build --release -q -p plumb-cli -p plumb-bench --manifest-path "$ROOT/Cargo.toml"

{
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r), $(rustc --version)"
  echo "base: $(git -C "$WT" log -1 --format='%h %s' | cut -c1-90)"
  echo "head: $(git -C "$ROOT" log -1 --format='%h %s' | cut -c1-90)"
} | tee "$LOG"

for round in $(seq 1 "$ROUNDS"); do
  for side in base head; do
    if [ $side = base ]; then bin=$TGT/release; else bin=$ROOT/target/release; fi
    echo "== round $round, $side: step overhead" | tee -a "$LOG"
    "$bin/step-overhead" 30 2>/dev/null | grep -E '^jq step end to end|^(jq1|jq40|http40) ' | sed "s/^/$side $round /" | tee -a "$LOG"
    echo "== round $round, $side: webhooks" | tee -a "$LOG"
    PLUMB_BIN=$bin/plumb LABEL=ab-$side-$round DUR=${DUR:-15} "$HERE/webhooks.sh" plumb > /dev/null 2>>"$LOG.stderr" || true
    ls -t "$ROOT"/bench/results/webhooks-*-ab-$side-$round.jsonl | head -1 | sed "s/^/$side $round results /" | tee -a "$LOG"
  done
done
python3 "$HERE/ab_summary.py" "$LOG" | tee -a "$LOG"

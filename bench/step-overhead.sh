#!/usr/bin/env bash
# Per-step overhead of durable runs (issue #2), one command:
#   bench/step-overhead.sh [RUNS]
# 1. in process: 40 jq steps, 40 http steps, 1 jq step (SQLite, synchronous=FULL);
# 2. the whole `plumb run` process (start, load, open store, run, exit) under hyperfine.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-50}"
cargo build --release -q -p plumb-cli -p plumb-bench
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), kernel $(uname -r)"
echo "== versions: $(./target/release/plumb --version), $(rustc --version)"
./target/release/step-overhead "$runs"

if command -v hyperfine >/dev/null; then
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
  mkdir -p "$dir/workflows"
  echo "connections: {}" > "$dir/plumb.yaml"
  {
    printf 'name: jq40\nowner: bench@example.com\ndescription: benchmark\nsteps:\n'
    printf "  - id: s0\n    jq: '{n: 0}'\n"
    for i in $(seq 1 39); do printf "  - id: s%d\n    jq: '.steps.s%d | .n += 1'\n" "$i" "$((i - 1))"; done
  } > "$dir/workflows/jq40.yaml"
  {
    printf 'name: empty\nowner: bench@example.com\ndescription: benchmark\nsteps:\n'
    printf "  - id: s0\n    jq: '1'\n"
  } > "$dir/workflows/empty.yaml"
  echo "== whole process: plumb run (process start + load + store open + run + exit)"
  hyperfine -N --warmup 3 --runs "$runs" \
    "./target/release/plumb --project $dir run empty" \
    "./target/release/plumb --project $dir run jq40" 2>&1 | grep -v '^ *$'
else
  echo "(hyperfine not installed: apt-get install hyperfine for the whole-process numbers)"
fi

#!/usr/bin/env bash
# Idle RSS of `plumb serve` with one webhook workflow, 3 samples, 4 s after
# start:  bench/idle-rss.sh [path/to/plumb]   (default: target/release/plumb)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/plumb}
[ -x "$bin" ] || cargo build --release -q -p plumb-cli
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/workflows"
printf 'listen: 127.0.0.1:0\nconnections:\n  sink:\n    http: { base_url: "http://127.0.0.1:9999", timeout: 10s }\n' > "$dir/plumb.yaml"
printf "name: ack\nowner: b@example.com\ndescription: d\ntrigger:\n  webhook: { path: ack }\nsteps:\n  - id: shape\n    jq: '.trigger.body.id'\n" > "$dir/workflows/ack.yaml"
for _ in 1 2 3; do
  "$bin" --project "$dir" serve > /dev/null 2>&1 & pid=$!
  sleep 4
  awk '/VmRSS/ {printf "%.1f MiB\n", $2/1024}' "/proc/$pid/status"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

#!/usr/bin/env bash
# Memory and journal size of one large for_each (issue #8, A.6), one command:
#   bench/foreach-memory.sh [ITEMS] [ROUNDS] [CONCURRENCY]
# A `plumb run` whose step fans out over ITEMS items (default 100000), each
# item an http POST to a local sink, CONCURRENCY at a time (default 16).
# Two workflows, run alternately in each round: `fanout` ends with the
# for_each; `fanout_read` has a later step that reads every item's output
# (`.steps.each`), which assembles them in memory. Reports, per run, the
# process's peak RSS (GNU time), wall time and the store's size (journal
# rows' bytes and the database files), then medians with min–max.
# Target: peak RSS under 200 MiB at 100 000 items.
set -euo pipefail
cd "$(dirname "$0")/.."
items="${1:-100000}"
rounds="${2:-3}"
concurrency="${3:-16}"
cargo build --release -q -p plumb-cli -p plumb-bench
plumb="$PWD/target/release/plumb"
sink="$PWD/target/release/bench-sink"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$sink" "$port" >/dev/null 2>&1 &
sink_pid=$!
work=$(mktemp -d)
trap 'kill $sink_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done

echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
echo "== versions: $("$plumb" --version), $(rustc --version), git $(git rev-parse --short HEAD)"
echo "== for_each over $items items, concurrency $concurrency, $rounds rounds"

# The workflow file, with or without the step that reads the item outputs.
workflow_file() { # name reader
  printf 'name: %s\nowner: bench@example.com\ndescription: for_each memory benchmark\nsteps:\n' "$1"
  printf "  - id: list\n    jq: '[range(%d) | {id: \"item-\\\\(.)\", n: .}]'\n" "$items"
  printf '  - id: each\n    for_each: "${{ .steps.list }}"\n    concurrency: %d\n' "$concurrency"
  printf '    http: { connection: sink, method: POST, path: /items, body: "${{ .item }}" }\n'
  if [ "$2" = yes ]; then
    printf "  - id: count\n    jq: '[.steps.each[] | select(.status == 200)] | length'\n"
  fi
}

results=()
for round in $(seq 1 "$rounds"); do
  for workflow in fanout fanout_read; do
    dir="$work/round$round-$workflow"
    mkdir -p "$dir/workflows"
    printf 'connections:\n  sink:\n    http: { base_url: "http://127.0.0.1:%d", timeout: 30s }\ndefaults:\n  retry: { attempts: 3, initial: 100ms, max: 1s }\n  timeout: 600s\n' "$port" > "$dir/plumb.yaml"
    if [ "$workflow" = fanout ]; then reader=no; else reader=yes; fi
    workflow_file "$workflow" "$reader" > "$dir/workflows/$workflow.yaml"
    curl -fs -X POST "http://127.0.0.1:$port/reset" >/dev/null
    /usr/bin/time -f '%M %e' -o "$dir/time" "$plumb" --project "$dir" run "$workflow" --json > "$dir/out.jsonl"
    read -r rss_kb secs < "$dir/time"
    status=$(tail -n 1 "$dir/out.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("status","?"))')
    delivered=$(curl -fs "http://127.0.0.1:$port/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accepted"])')
    read -r rows out_bytes state_bytes biggest files < <(python3 - "$dir/plumb.db" <<'PY'
import glob, os, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows, out, state = db.execute("SELECT count(*), coalesce(sum(length(output)),0), coalesce(sum(length(state)),0) FROM steps").fetchone()
biggest = db.execute("SELECT coalesce(max(length(output)),0) FROM steps").fetchone()[0]
db.close()
size = 0
for f in glob.glob(sys.argv[1] + "*"):
    try:
        size += os.stat(f).st_size
    except FileNotFoundError:
        pass
print(rows, out, state, biggest, size)
PY
)
    printf '%-11s round %d: status %s, delivered %s, peak RSS %.1f MiB, %.1f s, journal %s rows, outputs %.1f MiB (largest row %.1f KiB), state %.1f MiB, store files %.1f MiB\n' \
      "$workflow" "$round" "$status" "$delivered" "$(echo "$rss_kb/1024" | bc -l)" "$secs" "$rows" \
      "$(echo "$out_bytes/1048576" | bc -l)" "$(echo "$biggest/1024" | bc -l)" \
      "$(echo "$state_bytes/1048576" | bc -l)" "$(echo "$files/1048576" | bc -l)"
    results+=("$workflow $rss_kb $secs")
  done
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [l.split() for l in sys.stdin if l.strip()]
for workflow in ("fanout", "fanout_read"):
    mine = [r for r in rows if r[0] == workflow]
    rss = sorted(float(r[1]) / 1024 for r in mine)
    secs = sorted(float(r[2]) for r in mine)
    print(f"== {workflow}: median peak RSS {statistics.median(rss):.1f} MiB (min {rss[0]:.1f}, max {rss[-1]:.1f}); "
          f"median time {statistics.median(secs):.1f} s (min {secs[0]:.1f}, max {secs[-1]:.1f}); target < 200 MiB")
'

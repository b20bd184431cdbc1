#!/usr/bin/env bash
# W3 (issue 9): does plumb scale across worker processes on PostgreSQL?
#   bench/w3.sh [ROUNDS] [EVENTS]          (defaults 3 rounds, 1500 events)
#
# A workflow whose one http step waits 50 ms at the receiver (bench-sink,
# `?delay_ms=50`). For 1, 2 and 4 processes executing runs (one `plumb
# serve` plus 0, 1 or 3 `plumb worker`s, each with serve.workers = WORKERS,
# default 8), EVENTS webhooks are sent at once (hey, c=32) into a fresh
# PostgreSQL database, and the completed runs per second are measured at
# the receiver (unique deliveries / time from the first to the last). The
# configurations alternate within each round. Also per run of the
# benchmark: enqueue-to-start p50/p99 of runs sent one at a time (20/s) to
# idle workers of another process, with LISTEN/NOTIFY and with polling
# alone (`?notify=false`); then W1 and W6 (bench/webhooks.sh) with the
# store on SQLite and on PostgreSQL, alternating (W3_WEBHOOKS=0 skips them).
#
# Needs PostgreSQL (PLUMB_BENCH_POSTGRES, default
# postgres://postgres@127.0.0.1:5432/postgres; its user must create
# databases), hey, curl, python3. Results: bench/results/w3-<UTC time>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
EVENTS=${2:-1500}
WORKERS=${WORKERS:-8}
ADMIN=${PLUMB_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
OUT=bench/results/w3-$(date -u +%Y%m%dT%H%M%SZ).txt
mkdir -p bench/results
# PLUMB_BIN (and SINK_BIN) run binaries built elsewhere instead of building
# this checkout.
[ -n "${PLUMB_BIN:-}" ] || cargo build --release -q -p plumb-cli -p plumb-bench
PLUMB=${PLUMB_BIN:-$PWD/target/release/plumb}
SINK=${SINK_BIN:-$PWD/target/release/bench-sink}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PID=
PIDS=()   # plumb processes of the configuration being measured
stop_plumb() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; PIDS=(); }
cleanup() { stop_plumb; [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
say() { echo "$*" | tee -a "$OUT"; }
psql_admin() { psql "$ADMIN" -qAtc "$1"; }

SINK_PORT=$(free_port)
"$SINK" "$SINK_PORT" >/dev/null 2>&1 &
SINK_PID=$!
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$SINK_PORT/health" >/dev/null && break; sleep 0.1; done
sink() { curl -s -m 30 -X "$1" "http://127.0.0.1:$SINK_PORT$2"; }

say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
say "== versions: $("$PLUMB" --version), $(psql "$ADMIN" -qAtc 'SHOW server_version'), git $(git rev-parse --short HEAD)"
say "== W3: $EVENTS webhooks, one http step waiting 50 ms, serve.workers=$WORKERS per process, $ROUNDS rounds"

db_url() { python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2], query='').geturl())" "$ADMIN" "$1"; }

# A project on a fresh database; prints its directory.
project() {   # db listen [store URL options, e.g. ?notify=false]
  local dir url
  dir=$(mktemp -d)
  url=$(db_url "$1")${3:-}
  mkdir -p "$dir/workflows"
  cat > "$dir/plumb.yaml" <<EOF
store: $url
listen: $2
connections:
  sink:
    http: { base_url: "http://127.0.0.1:$SINK_PORT" }
serve:
  workers: $WORKERS
EOF
  cat > "$dir/workflows/slow.yaml" <<'EOF'
name: slow
owner: bench@example.com
description: one http step that waits 50 ms at the receiver
trigger:
  webhook: { path: slow }
steps:
  - id: call
    http: { connection: sink, method: POST, path: /w3, query: { delay_ms: 50 }, body: { id: '${{ .trigger.body.id }}' } }
EOF
  echo "$dir"
}

# Starts `plumb serve` (and N-1 workers) on project $1 listening at $2.
start() {   # dir listen n
  "$PLUMB" --project "$1" serve > /dev/null 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do curl -fs "http://$2/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  for _ in $(seq 2 "$3"); do
    "$PLUMB" --project "$1" worker > /dev/null 2>&1 &
    PIDS+=($!)
  done
  sleep 1
}

# Waits until the sink saw $1 unique ids (at most 120 s).
wait_unique() {
  for _ in $(seq 1 1200); do
    [ "$(sink GET /stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["unique"])')" -ge "$1" ] && return 0
    sleep 0.1
  done
  return 1
}

body=$(mktemp)
declare -A RATES
for round in $(seq 1 "$ROUNDS"); do
  for n in 1 2 4; do
    db="plumb_w3_${round}_${n}_$$"
    psql_admin "CREATE DATABASE $db"
    port=$(free_port)
    dir=$(project "$db" "127.0.0.1:$port")
    start "$dir" "127.0.0.1:$port" "$n"
    sink POST /reset >/dev/null
    # Unique ids: hey sends one body; a tiny Python sender sends distinct ones.
    python3 - "$port" "$EVENTS" <<'EOF'
import concurrent.futures, json, sys, urllib.request
port, events = sys.argv[1], int(sys.argv[2])
def send(i):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/slow", data=json.dumps({"id": f"e{i}"}).encode(), headers={"content-type": "application/json"})
    for _ in range(50):
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 202:
                    return
        except Exception:
            pass
with concurrent.futures.ThreadPoolExecutor(32) as pool:
    list(pool.map(send, range(events)))
EOF
    if wait_unique "$EVENTS"; then
      rate=$(sink GET /stats | python3 -c 'import json,sys; s=json.load(sys.stdin); span=(s["last_ts"] or 0)-(s["first_ts"] or 0); u=s["unique"]; d=s["duplicate_deliveries"]; print(f"{u/span:.1f} {d}" if span>0 else "0 0")')
    else
      rate="0 timeout"
    fi
    say "round $round, $n process(es): $rate  (completed runs/s, duplicate deliveries)"
    RATES[$n]="${RATES[$n]:-} ${rate%% *}"
    stop_plumb
    psql_admin "DROP DATABASE $db WITH (FORCE)"
    rm -rf "$dir"
  done
done

median() { python3 -c 'import statistics,sys; xs=sorted(float(x) for x in sys.argv[1:]); print(f"{statistics.median(xs):.1f} ({xs[0]:.1f}-{xs[-1]:.1f})")' "$@"; }
say "== median (min-max) completed runs/s over $ROUNDS rounds"
for n in 1 2 4; do
  # shellcheck disable=SC2086
  say "  $n process(es): $(median ${RATES[$n]})"
done
one=$(python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' ${RATES[1]})
four=$(python3 -c 'import statistics,sys; print(statistics.median(float(x) for x in sys.argv[1:]))' ${RATES[4]})
say "  4 processes / 1 process: $(python3 -c "print(f'{$four/$one:.2f}x')") (target >= 3.6x)"

# Enqueue-to-start through another process, with LISTEN/NOTIFY and with
# polling alone (`?notify=false`): the serve takes the webhooks, a worker
# starts the runs; read from created_at -> started_at. Alternating, ROUNDS
# times.
declare -A LAT
for round in $(seq 1 "$ROUNDS"); do
  for mode in notify poll; do
    db="plumb_w3_latency_${mode}_$$"
    psql_admin "CREATE DATABASE $db"
    port=$(free_port)
    opts=; [ $mode = poll ] && opts='?notify=false'
    dir=$(project "$db" "127.0.0.1:$port" "$opts")
    # The serve's only worker is kept busy by a run that waits 10 minutes,
    # so every measured run is started by the other process: the
    # cross-process wake-up, not the serve's own in-process one.
    wdir=$(mktemp -d)
    cp -r "$dir/." "$wdir/"
    sed -i 's/^  workers: .*/  workers: 1/' "$dir/plumb.yaml"
    sed -i 's/^    http: { base_url: \(.*\) }$/    http: { base_url: \1, timeout: 900s }/' "$dir/plumb.yaml"
    cat > "$dir/workflows/block.yaml" <<'EOF'
name: block
owner: bench@example.com
description: keeps the serve's one worker busy
trigger:
  webhook: { path: block }
timeout: 900s
steps:
  - id: wait
    http: { connection: sink, method: POST, path: /block, query: { delay_ms: 600000 } }
EOF
    "$PLUMB" --project "$dir" serve > /dev/null 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
    curl -s -o /dev/null -H 'content-type: application/json' -d '{}' "http://127.0.0.1:$port/hooks/block"
    sleep 1
    "$PLUMB" --project "$wdir" worker > /dev/null 2>&1 &
    PIDS+=($!)
    sleep 1
    for i in $(seq 1 200); do
      curl -s -o /dev/null -H 'content-type: application/json' -d "{\"id\":\"l$i\"}" "http://127.0.0.1:$port/hooks/slow"
      sleep 0.05
    done
    sleep 2
    row=$(psql "$(db_url "$db")" -qAtc "SELECT round(percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - created_at)::numeric, 1) || ' ' || round(percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - created_at)::numeric, 1) || ' ' || max(started_at - created_at) || ' ' || count(*) FILTER (WHERE started_at IS NOT NULL) FROM runs WHERE workflow = 'slow'")
    read -r p50 p99 max started <<< "$row"
    say "round $round, enqueue-to-start with $mode: p50 $p50 ms, p99 $p99 ms, max $max ms ($started of 200 runs started)"
    LAT[$mode-p50]="${LAT[$mode-p50]:-} $p50"
    LAT[$mode-p99]="${LAT[$mode-p99]:-} $p99"
    stop_plumb
    psql_admin "DROP DATABASE $db WITH (FORCE)"
    rm -rf "$dir" "$wdir"
  done
done
say "== enqueue-to-start, 200 runs at 20/s taken by a serve and started by a worker, median (min-max) over $ROUNDS rounds, ms"
for mode in notify poll; do
  # shellcheck disable=SC2086
  say "  $mode: p50 $(median ${LAT[$mode-p50]}), p99 $(median ${LAT[$mode-p99]}) (target p99 <= 20 ms with notify)"
done
rm -f "$body"

# W1 and W6 (bench/webhooks.sh, plumb only) with the store on SQLite and
# on PostgreSQL, alternating; summarised by bench/ab_summary.py.
if [ "${W3_WEBHOOKS:-1}" = 1 ]; then
  WLOG=${OUT%.txt}-webhooks.txt
  : > "$WLOG"
  for round in $(seq 1 "$ROUNDS"); do
    for side in sqlite postgres; do
      store=
      if [ $side = postgres ]; then
        db="plumb_w3_webhooks_$$"
        psql_admin "CREATE DATABASE $db"
        store=$(db_url "$db")
      fi
      PLUMB_BIN=$PLUMB PLUMB_STORE=$store LABEL=w3-$side-$round DUR=${DUR:-15} RATES=${RATES:-"2000 5000"} \
        bench/webhooks.sh plumb > /dev/null 2>> "$WLOG.stderr" || true
      echo "$side $round results $(ls -t bench/results/webhooks-*-w3-$side-$round.jsonl | head -1)" >> "$WLOG"
      [ $side = postgres ] && psql_admin "DROP DATABASE $db WITH (FORCE)"
    done
  done
  python3 bench/ab_summary.py "$WLOG" | tee -a "$OUT"
fi
say "results: $OUT"

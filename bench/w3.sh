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
# idle workers of another process (a worker, not the serve that took the
# webhook): the LISTEN/NOTIFY wake-up path.
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
cargo build --release -q -p plumb-cli -p plumb-bench
PLUMB=$PWD/target/release/plumb
SINK=$PWD/target/release/bench-sink

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

# A project on a fresh database; prints its directory.
project() {   # db listen
  local dir url
  dir=$(mktemp -d)
  url=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2]).geturl())" "$ADMIN" "$1")
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

# Enqueue-to-start through another process: a serve with no spare worker
# capacity would take the run itself, so the serve runs 1 worker and is kept
# busy by nothing; the measurement reads created_at -> started_at.
db="plumb_w3_latency_$$"
psql_admin "CREATE DATABASE $db"
port=$(free_port)
dir=$(project "$db" "127.0.0.1:$port")
start "$dir" "127.0.0.1:$port" 2
for i in $(seq 1 200); do
  curl -s -o /dev/null -H 'content-type: application/json' -d "{\"id\":\"l$i\"}" "http://127.0.0.1:$port/hooks/slow"
  sleep 0.05
done
sleep 2
url=$(python3 -c "import sys,urllib.parse as u; p=u.urlparse(sys.argv[1]); print(p._replace(path='/'+sys.argv[2]).geturl())" "$ADMIN" "$db")
say "== enqueue-to-start, 200 runs at 20/s (serve + 1 worker, either may start a run), ms: $(psql "$url" -qAtc "SELECT 'p50 ' || percentile_cont(0.5) WITHIN GROUP (ORDER BY started_at - created_at) || ', p99 ' || percentile_cont(0.99) WITHIN GROUP (ORDER BY started_at - created_at) || ', max ' || max(started_at - created_at) FROM runs")"
stop_plumb
psql_admin "DROP DATABASE $db WITH (FORCE)"
rm -rf "$dir" "$body"
say "results: $OUT"

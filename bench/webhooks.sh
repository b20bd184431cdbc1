#!/usr/bin/env bash
# Webhook benchmarks (issue #3), plumb side by side with n8n and Node-RED:
#   bench/webhooks.sh [plumb|peers|all]          (default: all)
#
#   W5  plumb start-to-ready (process start → /readyz 200) and idle RSS;
#       the peers' start-to-first-200 and idle RSS in the same run.
#   W1  webhook → durable ack on SQLite FULL: hey at fixed total rates
#       (RATES), c=64; plus closed-loop wrk c=64 for the ceiling.
#   W6  webhook → jq → HTTP POST to a local receiver, end to end, wrk
#       closed loop at c=1, 8, 64 with a unique id per request (the peers'
#       post.lua). plumb acknowledges once durable and runs asynchronously,
#       so its figure is completed runs/s measured at the receiver
#       (deliveries / (last − first delivery)); the peers answer after the
#       POST, so theirs is wrk's req/s (checked against the receiver).
#
# Every process shares the same 2 cores; the receiver is bench-sink (Rust)
# for all three. Peers must have been installed by
# ../shared/bench/peers/install.sh (under $PEERS_DIR, default
# /tmp/plumb-peers). Results: bench/results/webhooks-<UTC time>[-LABEL].jsonl.
#
# PLUMB_BIN=path runs that plumb binary instead of building this checkout
# (bench/ab.sh uses it to compare two builds); LABEL names the results file;
# PLUMB_STORE=postgres://… puts plumb's store there (an empty database; the
# default is SQLite in the project; bench/w3.sh uses it).
# plumb listens on a free port; the sink on 9999, where the peers' flows
# post.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
PEERS=$(cd "$ROOT/../shared/bench/peers" 2>/dev/null && pwd || true)
WHAT=${1:-all}
DUR=${DUR:-20}
RATES=${RATES:-"2000 5000 10000 15000"}
CONCS=${CONCS:-"1 8 64"}
OUT=$ROOT/bench/results/webhooks-$(date -u +%Y%m%dT%H%M%SZ)${LABEL:+-$LABEL}.jsonl
mkdir -p "$ROOT/bench/results"
PIDS=()
# Named apart from the peers' run.sh `cleanup`, which sourcing it defines:
# both run on exit, so bench-sink never outlives the run.
bench_cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap bench_cleanup EXIT INT TERM
log() { echo "[$(date +%T)] $*" >&2; }
emit() { echo "$1" >> "$OUT"; echo "$1"; }

command -v wrk >/dev/null && command -v hey >/dev/null || { echo "needs wrk and hey: apt-get install wrk hey" >&2; exit 1; }
if [ -z "${PLUMB_BIN:-}" ] || [ ! -x "$ROOT/target/release/bench-sink" ]; then
  cargo build --release -q -p plumb-cli -p plumb-bench --manifest-path "$ROOT/Cargo.toml" || exit 1
fi
PLUMB=${PLUMB_BIN:-$ROOT/target/release/plumb}
SINKBIN=$ROOT/target/release/bench-sink
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $($PLUMB --version)"

$SINKBIN 9999 > /tmp/bench-sink.log 2>&1 &
PIDS+=($!)
for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:9999/health && break; sleep 0.1; done
sink() { curl -s -m 30 -X "$1" "http://127.0.0.1:9999$2"; }

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null; }

# --- plumb -------------------------------------------------------------------
plumb_project() {   # dir
  rm -rf "$1"; mkdir -p "$1/workflows"
  cat > "$1/plumb.yaml" <<EOF
${PLUMB_STORE:+store: $PLUMB_STORE}
listen: 127.0.0.1:$PORT
connections:
  sink:
    http: { base_url: "http://127.0.0.1:9999", timeout: 10s }
serve:
  workers: 64
EOF
  cat > "$1/workflows/ingest.yaml" <<'EOF'
name: ingest
owner: bench@example.com
description: W6 — the peers' workflow (transform, then POST to the sink).
trigger:
  webhook: { path: ingest }
steps:
  - id: shape
    jq: '.trigger.body | {id, name: (.name | ascii_upcase), email, processed_by: "plumb"}'
  - id: deliver
    http: { connection: sink, method: POST, path: /sink/plumb, body: "${{ .steps.shape }}" }
EOF
  cat > "$1/workflows/ack.yaml" <<'EOF'
name: ack
owner: bench@example.com
description: W1 — accept durably; one jq step.
trigger:
  webhook: { path: ack }
steps:
  - id: shape
    jq: '.trigger.body.id'
EOF
  # /api/v1 needs a token (issue #4): a viewer token for wait_drained.
  TOKEN=$("$PLUMB" --project "$1" tokens create --name bench --role viewer --json \
    | python3 -c "import json,sys; print(json.load(sys.stdin)['token'])")
}

start_plumb() {   # dir → sets PLUMB_PID and READY_MS (process start → /readyz 200)
  local t0 t1
  t0=$(date +%s%N)
  "$PLUMB" --project "$1" serve > "$1/serve.log" 2>&1 &
  PLUMB_PID=$!
  PIDS+=($PLUMB_PID)
  for _ in $(seq 1 2000); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$PORT/readyz)" = 200 ] && break
    sleep 0.002
  done
  t1=$(date +%s%N)
  READY_MS=$(( (t1 - t0) / 1000000 ))
}

wait_drained() {   # until no run is queued or running; prints seconds waited
  local t0=$SECONDS
  while :; do
    local q
    q=$(curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:$PORT/api/v1/status | python3 -c "import json,sys; d=json.load(sys.stdin); print(sum(w['queued']+w['running'] for w in d['workflows']))" 2>/dev/null)
    [ "$q" = 0 ] && break
    [ $((SECONDS - t0)) -gt 600 ] && { log "not drained after 600 s"; break; }
    sleep 0.2
  done
  echo $((SECONDS - t0))
}

bench_plumb() {
  local dir=/tmp/plumb-bench-project
  plumb_project "$dir"
  start_plumb "$dir"
  sleep 5
  emit "{\"system\":\"plumb\",\"bench\":\"W5\",\"start_to_ready_ms\":$READY_MS,\"idle_rss_mib\":$(rss_mib $PLUMB_PID)}"

  echo '{"id":"w1","name":"user","email":"u@example.com"}' > /tmp/w1-body.json
  for rate in $RATES; do
    local q=$(( rate / 64 ))
    log "plumb W1: $rate req/s for ${DUR}s"
    local h; h=$(hey -z ${DUR}s -c 64 -q $q -m POST -T application/json -D /tmp/w1-body.json http://127.0.0.1:$PORT/hooks/ack)
    local rps p50 p99 codes
    rps=$(echo "$h" | awk '/Requests\/sec/ {print $2}')
    p50=$(echo "$h" | awk '/50% in/ {print $3*1000}')
    p99=$(echo "$h" | awk '/99% in/ {print $3*1000}')
    codes=$(echo "$h" | awk '$1 ~ /^\[[0-9]+\]$/ {gsub(/[\[\]]/,"",$1); printf "%s\"%s\":%s", sep, $1, $2; sep=","}')
    emit "{\"system\":\"plumb\",\"bench\":\"W1\",\"target_rps\":$rate,\"rps\":$rps,\"p50_ms\":$p50,\"p99_ms\":$p99,\"codes\":{$codes},\"rss_mib\":$(rss_mib $PLUMB_PID)}"
    wait_drained > /dev/null
  done
  log "plumb W1: closed loop c=64 for 10s"
  local w; w=$(wrk -t2 -c64 -d10s -s "$PEERS/post.lua" http://127.0.0.1:$PORT/hooks/ack -- w1max | grep WRKJSON | cut -d' ' -f2-)
  emit "{\"system\":\"plumb\",\"bench\":\"W1max\",\"c\":64,\"wrk\":$w}"
  local drain; drain=$(wait_drained)
  emit "{\"system\":\"plumb\",\"bench\":\"W1max-drain\",\"drain_s\":$drain}"

  for c in $CONCS; do
    sink POST /reset > /dev/null
    log "plumb W6: c=$c ${DUR}s"
    local t=2; [ "$c" = 1 ] && t=1
    w=$(wrk -t$t -c$c -d${DUR}s --timeout 30s -s "$PEERS/post.lua" http://127.0.0.1:$PORT/hooks/ingest -- plumb-c$c | grep WRKJSON | cut -d' ' -f2-)
    drain=$(wait_drained)
    local s; s=$(sink GET /stats)
    emit "{\"system\":\"plumb\",\"bench\":\"W6\",\"c\":$c,\"dur_s\":$DUR,\"wrk\":$w,\"drain_after_load_s\":$drain,\"sink\":$s,\"rss_mib\":$(rss_mib $PLUMB_PID)}"
  done
  kill $PLUMB_PID; wait $PLUMB_PID 2>/dev/null
}

# --- peers -------------------------------------------------------------------
bench_peers() {
  [ -n "$PEERS" ] || { log "no ../shared/bench/peers"; return; }
  # shellcheck source=/dev/null
  local bench_here=$HERE
  source "$PEERS/run.sh"       # functions only (it returns when sourced)
  HERE=$PEERS                  # run.sh's helpers find their flows through HERE
  start_sink() { :; }          # bench-sink already listens on 9999
  trap 'bench_cleanup; cleanup' EXIT INT TERM
  for peer in node-red n8n; do
    local startfn=start_nodered
    if [ $peer = n8n ]; then setup_n8n || { log "n8n setup failed"; continue; }; startfn=start_n8n; fi
    local t0 t1; t0=$(date +%s%N)
    $startfn || { log "$peer failed to start"; continue; }
    t1=$(date +%s%N)
    sleep 5
    emit "{\"system\":\"$peer\",\"bench\":\"W5\",\"start_to_first_200_ms\":$(( (t1 - t0) / 1000000 )),\"idle_rss_mib\":$(rss_mib $PEER_PID)}"
    for c in $CONCS; do
      sink POST /reset > /dev/null
      log "$peer W6: c=$c ${DUR}s"
      local t=2; [ "$c" = 1 ] && t=1
      local w; w=$(timeout $((DUR + 60)) wrk -t$t -c$c -d${DUR}s --timeout 30s -s "$PEERS/post.lua" "$PEER_URL" -- "$peer-c$c" | grep WRKJSON | cut -d' ' -f2-)
      sleep 3
      local s; s=$(sink GET /stats)
      emit "{\"system\":\"$peer\",\"bench\":\"W6\",\"c\":$c,\"dur_s\":$DUR,\"wrk\":$w,\"sink\":$s,\"rss_mib\":$(rss_mib $PEER_PID)}"
    done
    stop_peer
  done
  HERE=$bench_here
}

case "$WHAT" in
  plumb) bench_plumb ;;
  peers) bench_peers ;;
  all) bench_plumb; bench_peers ;;
esac
log "results: $OUT"
python3 "$HERE/summarize_webhooks.py" "$OUT"

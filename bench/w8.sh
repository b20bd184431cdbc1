#!/usr/bin/env bash
# W8: the W7 mock API -> PostgreSQL upserts, side by side with n8n.
#   bench/w8.sh [ROUNDS] [RECORDS]        (defaults 3 rounds, 100000 records)
#
# The mock API of W7 (bench-sink's `GET /records`, 100 records per page,
# cursor-paginated) serves RECORDS records. The workflow fetches every page
# (plumb: `paginate`, copied from W7; n8n: the HTTP Request node's built-in
# pagination), shapes each record (id as text, email lower-cased, name) and
# upserts it into PostgreSQL:
#
#   INSERT INTO w8_contacts (id, email, name, updated_at) VALUES ($1, $2, $3, now())
#   ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, updated_at = now()
#
# plumb runs four variants, each its own JSON line (`variant`):
#   batch+exactly_once, batch        -- `for_each` over chunks of 1,000 records, a
#                                       `sql` step with `batch: .item` (one
#                                       transaction per chunk)
#   for_each+exactly_once, for_each  -- `for_each` over the records, one
#                                       statement (one transaction) per record
# with `exactly_once: true` / `false` on the postgres connection, and
# `concurrency: $W8_CONCURRENCY` (default 4, as W7's POSTs) on the for_each.
# n8n: bench/w8-n8n.sh (its Postgres node, Execute Query with the same
# statement and query parameters; bench/n8n/w8-workflow.json).
#
# Every run starts on a fresh table (dropped and created, plus a CHECKPOINT)
# and, for plumb, a fresh project and no `plumb_effects` table. Per run:
# rows/s = RECORDS / seconds, where seconds runs from the start of the run to
# its end (plumb: launching `plumb run` to its exit; n8n: its execution's own
# startedAt/stoppedAt, see bench/w8-n8n.sh), both after the last row was
# committed; `last_row_s` (max(updated_at), i.e. the start of the last
# transaction, minus the start) is a cross-check. Peak RSS as in W7 (plumb:
# `/usr/bin/time` max RSS of `plumb run`; n8n: its process tree, sampled every
# 100 ms); store bytes as in W7 (plumb's SQLite file and WAL; n8n's data dir
# growth). Afterwards the table must hold exactly RECORDS rows, each the
# shaped record (`valid`), else the run is `ok: false`. Each round runs
# plumb's variants, then n8n.
#
# N8N=0 skips n8n (needs ../shared/bench/peers/install.sh once; see
# bench/w8-n8n.sh); PLUMB=0 skips plumb. PLUMB_BIN / SINK_BIN run binaries
# built elsewhere; W8_PG_URL another database (default
# postgres://postgres@127.0.0.1:5432/test, no password: trust auth).
# Results: bench/results/w8-<UTC time>.txt (one JSON line per run, then the
# summary). The table w8_contacts is dropped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
RECORDS=${2:-100000}
PG=${W8_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
CONCURRENCY=${W8_CONCURRENCY:-4}
CHUNK=1000
VARIANTS=${W8_VARIANTS:-batch+exactly_once batch for_each+exactly_once for_each}
OUT=bench/results/w8-$(date -u +%Y%m%dT%H%M%SZ).txt
mkdir -p bench/results
if [ "${PLUMB:-1}" != 0 ] && [ -z "${PLUMB_BIN:-}" ]; then
  cargo build --release -q -p plumb-cli -p plumb-bench
fi
PLUMB=${PLUMB:-1}
PLUMB_EXE=${PLUMB_BIN:-$PWD/target/release/plumb}
SINK=${SINK_BIN:-$PWD/target/release/bench-sink}

command -v psql >/dev/null || { echo "w8: psql not found" >&2; exit 1; }
q() { PGOPTIONS="-c client_min_messages=warning" psql "$PG" -XqAt -v ON_ERROR_STOP=1 "$@"; }
q -c 'SELECT 1' >/dev/null || { echo "w8: cannot reach PostgreSQL at $PG" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(free_port)
"$SINK" "$SINK_PORT" >/dev/null 2>&1 &
SINK_PID=$!
cleanup() {
  kill $SINK_PID 2>/dev/null || true
  q -c 'DROP TABLE IF EXISTS w8_contacts; DROP TABLE IF EXISTS plumb_effects' >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$SINK_PORT/health" >/dev/null && break; sleep 0.1; done
say() { echo "$*" | tee -a "$OUT"; }

say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
if [ "$PLUMB" != 0 ]; then
  say "== versions: $("$PLUMB_EXE" --version), git $(git rev-parse --short HEAD), $(q -c 'SHOW server_version' | sed 's/^/PostgreSQL /')"
else
  say "== versions: git $(git rev-parse --short HEAD), $(q -c 'SHOW server_version' | sed 's/^/PostgreSQL /')"
fi
say "== W8: $RECORDS records, 100 per page, shaped and upserted into PostgreSQL (w8_contacts); plumb variants: $VARIANTS (for_each concurrency $CONCURRENCY, chunks of $CHUNK); $ROUNDS rounds"

# A fresh target table (and no plumb_effects), checkpointed so that one run's
# dirty pages are not flushed during the next.
fresh_table() {
  q <<'SQL' >/dev/null
DROP TABLE IF EXISTS w8_contacts;
DROP TABLE IF EXISTS plumb_effects;
CREATE TABLE w8_contacts (id text PRIMARY KEY, email text, name text, updated_at timestamptz);
CHECKPOINT;
SQL
}
# "rows distinct valid last_epoch effects_rows": rows, distinct ids, rows
# equal to their shaped record, max(updated_at) in epoch seconds, and rows in
# plumb_effects (0 when there is no such table)
table_stats() {
  local effects=0
  if [ "$(q -c "SELECT to_regclass('plumb_effects') IS NOT NULL")" = t ]; then
    effects=$(q -c 'SELECT count(*) FROM plumb_effects')
  fi
  echo "$(q -F ' ' -v records="$RECORDS" <<'SQL'
SELECT count(*), count(DISTINCT id),
  count(*) FILTER (WHERE id ~ '^[0-9]+$' AND id::bigint < :records
                     AND email = 'user.' || id || '@example.com' AND name = 'Record ' || id),
  coalesce(extract(epoch FROM max(updated_at)), 0)
FROM w8_contacts
SQL
)" "$effects"
}

plumb_once() {   # VARIANT -> one JSON line
  local variant=$1 dir exactly_once=false mode=${1%%+*}
  case "$variant" in *+exactly_once) exactly_once=true ;; esac
  dir=$(mktemp -d)
  mkdir -p "$dir/workflows"
  cat > "$dir/plumb.yaml" <<EOF
connections:
  api:
    http: { base_url: "http://127.0.0.1:$SINK_PORT" }
  wh:
    postgres: { url: "$PG", pool: 8, exactly_once: $exactly_once }
EOF
  local shape upsert
  if [ "$mode" = batch ]; then
    shape="[.steps.fetch.pages[].body.data[] | {id: (.id | tostring), email: (.email | ascii_downcase), name}] | [range(0; length; $CHUNK) as \$i | .[\$i:\$i + $CHUNK]]"
    upsert="      batch: '\${{ .item }}'
      params: ['\${{ .id }}', '\${{ .email }}', '\${{ .name }}']"
  else
    shape='[.steps.fetch.pages[].body.data[] | {id: (.id | tostring), email: (.email | ascii_downcase), name}]'
    upsert="      params: ['\${{ .item.id }}', '\${{ .item.email }}', '\${{ .item.name }}']"
  fi
  cat > "$dir/workflows/w8.yaml" <<EOF
name: w8
owner: bench@example.com
description: every page of the records API, shaped, upserted into PostgreSQL ($variant)
steps:
  - id: fetch
    http:
      connection: api
      path: /records
      query: { limit: 100, total: $RECORDS }
      paginate:
        next: '\${{ .response.body.next_cursor | if . then {query: {cursor: .}} else null end }}'
        max_pages: 100000
  - id: shape
    jq: '$shape'
  - id: upsert
    for_each: '\${{ .steps.shape }}'
    concurrency: $CONCURRENCY
    sql:
      connection: wh
      query: "INSERT INTO w8_contacts (id, email, name, updated_at) VALUES (\$1, \$2, \$3, now()) ON CONFLICT (id) DO UPDATE SET email = excluded.email, name = excluded.name, updated_at = now()"
$upsert
EOF
  fresh_table
  curl -s -m 30 -X POST "http://127.0.0.1:$SINK_PORT/reset" >/dev/null
  local start end code=0 rss bytes
  start=$(python3 -c 'import time; print(time.time())')
  /usr/bin/time -o "$dir/rss" -f '%M' "$PLUMB_EXE" --project "$dir" --json run w8 >"$dir/out" 2>"$dir/err" || code=$?
  end=$(python3 -c 'import time; print(time.time())')
  rss=$(tail -1 "$dir/rss")
  bytes=$(du -cb "$dir"/plumb.db* 2>/dev/null | tail -1 | cut -f1)
  if [ "$code" != 0 ]; then
    { echo "w8: plumb ($variant) exited $code; last lines:"; tail -5 "$dir/out"; tail -5 "$dir/err"; } >>"$OUT.stderr"
  fi
  table_stats | python3 -c '
import json, sys
rows, uniq, valid, last, effects = sys.stdin.read().split()
variant, start, end, code, rss, size, want = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6] or 0), int(sys.argv[7])
rows, uniq, valid, last, effects = int(rows), int(uniq), int(valid), float(last), int(effects)
secs = end - start
print(json.dumps({"system": "plumb", "variant": variant, "rows": rows, "unique": uniq, "valid": valid,
  "seconds": round(secs, 3), "rows_per_s": round(want / secs, 1) if secs > 0 else 0,
  "last_row_s": round(last - start, 3) if last else None, "peak_rss_mb": round(rss / 1024, 1),
  "store_bytes": size, "effects_rows": effects, "exit": code,
  "ok": code == 0 and rows == want and uniq == want and valid == want}))' \
    "$variant" "$start" "$end" "$code" "$rss" "$bytes" "$RECORDS"
  rm -rf "$dir"
}

n8n_once() {
  fresh_table
  local line
  line=$(bench/w8-n8n.sh "$SINK_PORT" "$RECORDS" 2>>"$OUT.stderr") || line=""
  [ -n "$line" ] || line='{"system":"n8n","ok":false}'
  echo "$line"
}

for round in $(seq 1 "$ROUNDS"); do
  if [ "$PLUMB" != 0 ]; then
    for variant in $VARIANTS; do say "$(plumb_once "$variant")"; done
  fi
  if [ "${N8N:-1}" != 0 ]; then say "$(n8n_once)"; fi
done
python3 - "$OUT" <<'EOF' | tee -a "$OUT"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def line(sel, field):
    v = [r[field] for r in rows if sel(r) and r.get("ok") and r.get(field) is not None]
    if not v:
        return "n/a"
    return f"{statistics.median(v):,.1f} ({min(v):,.1f}-{max(v):,.1f}, n={len(v)})"
groups = []
for r in rows:
    g = (r.get("system"), r.get("variant"))
    if g not in groups:
        groups.append(g)
for system, variant in groups:
    sel = lambda r, s=system, v=variant: r.get("system") == s and r.get("variant") == v
    bad = sum(1 for r in rows if sel(r) and not r.get("ok"))
    print(f"{system} {variant or ''}: rows/s {line(sel, 'rows_per_s')}; seconds {line(sel, 'seconds')}; "
          f"peak RSS MiB {line(sel, 'peak_rss_mb')}; store bytes {line(sel, 'store_bytes')}"
          + (f"; FAILED runs: {bad}" if bad else ""))
n = [r["rows_per_s"] for r in rows if r.get("system") == "n8n" and r.get("ok")]
for system, variant in groups:
    if system != "plumb":
        continue
    p = [r["rows_per_s"] for r in rows if r.get("system") == system and r.get("variant") == variant and r.get("ok")]
    if p and n:
        print(f"plumb {variant} / n8n (medians): {statistics.median(p) / statistics.median(n):.2f}x")
EOF

#!/usr/bin/env bash
# W7 (issue 10): a paginated sync, side by side with n8n.
#   bench/w7.sh [ROUNDS] [RECORDS]        (defaults 3 rounds, 100000 records)
#
# A mock API (bench-sink's `GET /records`) serves RECORDS records, 100 per
# page, cursor-paginated. The workflow fetches every page (plumb:
# `paginate`, each page journaled; n8n: the HTTP Request node's built-in
# pagination), shapes each record (id as text, email lower-cased, name),
# and POSTs them to the same sink in batches of 500. Per system and round:
# records/s end to end (from the start of the run to the sink's last
# batch), pages/s, peak RSS (plumb: `/usr/bin/time` max RSS of the `plumb
# run` process; n8n: its process tree, sampled every 100 ms), and the bytes
# its store holds afterwards (plumb: the SQLite file and WAL of a fresh
# project; n8n: its data directory's growth). plumb and n8n alternate
# within each round.
#
# N8N=0 skips n8n (needs ../shared/bench/peers/install.sh once; see
# bench/w7-n8n.sh). PLUMB_BIN / SINK_BIN run binaries built elsewhere.
# Results: bench/results/w7-<UTC time>.txt (one JSON line per run, then the
# summary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
RECORDS=${2:-100000}
OUT=bench/results/w7-$(date -u +%Y%m%dT%H%M%SZ).txt
mkdir -p bench/results
[ -n "${PLUMB_BIN:-}" ] || cargo build --release -q -p plumb-cli -p plumb-bench
PLUMB=${PLUMB_BIN:-$PWD/target/release/plumb}
SINK=${SINK_BIN:-$PWD/target/release/bench-sink}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SINK_PORT=$(free_port)
"$SINK" "$SINK_PORT" >/dev/null 2>&1 &
SINK_PID=$!
trap 'kill $SINK_PID 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 1 50); do curl -fs "http://127.0.0.1:$SINK_PORT/health" >/dev/null && break; sleep 0.1; done
sink() { curl -s -m 30 -X "$1" "http://127.0.0.1:$SINK_PORT$2"; }
say() { echo "$*" | tee -a "$OUT"; }

say "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/{print $2}') GiB"
say "== versions: $("$PLUMB" --version), git $(git rev-parse --short HEAD)"
say "== W7: $RECORDS records, 100 per page, shaped and POSTed in batches of 500; $ROUNDS rounds"

plumb_once() {
  local dir
  dir=$(mktemp -d)
  mkdir -p "$dir/workflows"
  cat > "$dir/plumb.yaml" <<EOF
connections:
  api:
    http: { base_url: "http://127.0.0.1:$SINK_PORT" }
  sink:
    http: { base_url: "http://127.0.0.1:$SINK_PORT" }
EOF
  cat > "$dir/workflows/w7.yaml" <<EOF
name: w7
owner: bench@example.com
description: every page of the records API, shaped, posted in batches of 500
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
    jq: '[.steps.fetch.pages[].body.data[] | {id: (.id | tostring), email: (.email | ascii_downcase), name}] | [range(0; length; 500) as \$i | .[\$i:\$i + 500]]'
  - id: send
    for_each: '\${{ .steps.shape }}'
    concurrency: 4
    http: { connection: sink, method: POST, path: /w7/plumb, body: { records: '\${{ .item }}' } }
EOF
  sink POST /reset >/dev/null
  local start rss
  start=$(python3 -c 'import time; print(time.time())')
  rss=$( { /usr/bin/time -f '%M' "$PLUMB" --project "$dir" --json run w7 >/dev/null; } 2>&1 | tail -1 )
  local bytes
  bytes=$(du -cb "$dir"/plumb.db* | tail -1 | cut -f1)
  sink GET /stats | python3 -c '
import json, sys
s = json.load(sys.stdin)
start, rss, size, want = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
secs = (s["last_ts"] or start) - start
print(json.dumps({"system": "plumb", "records": s["records"], "unique": s["unique"], "pages": s["pages"],
  "seconds": round(secs, 3), "records_per_s": round(s["records"] / secs, 1) if secs > 0 else 0,
  "pages_per_s": round(s["pages"] / secs, 1) if secs > 0 else 0, "peak_rss_mb": round(rss / 1024, 1),
  "store_bytes": size, "ok": s["records"] == want and s["unique"] == want}))' "$start" "$rss" "$bytes" "$RECORDS"
  rm -rf "$dir"
}

for round in $(seq 1 "$ROUNDS"); do
  say "$(plumb_once)"
  if [ "${N8N:-1}" != 0 ]; then
    say "$(bench/w7-n8n.sh "$SINK_PORT" "$RECORDS" 2>>"$OUT.stderr" || echo '{"system":"n8n","ok":false}')"
  fi
done
python3 - "$OUT" <<'EOF' | tee -a "$OUT"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def line(system, field):
    v = [r[field] for r in rows if r.get("system") == system and r.get("ok")]
    if not v:
        return "n/a"
    return f"{statistics.median(v):,.1f} ({min(v):,.1f}-{max(v):,.1f}, n={len(v)})"
for system in ("plumb", "n8n"):
    print(f"{system}: records/s {line(system, 'records_per_s')}; pages/s {line(system, 'pages_per_s')}; "
          f"peak RSS MiB {line(system, 'peak_rss_mb')}; store bytes {line(system, 'store_bytes')}")
p = [r["records_per_s"] for r in rows if r.get("system") == "plumb" and r.get("ok")]
n = [r["records_per_s"] for r in rows if r.get("system") == "n8n" and r.get("ok")]
if p and n:
    print(f"plumb / n8n (medians): {statistics.median(p) / statistics.median(n):.1f}x")
EOF

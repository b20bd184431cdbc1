#!/usr/bin/env bash
# W10 (issue 9): status, dead-letter listing, intake, store size and RSS at
# 10k, 100k, 1M and 2M stored runs, and W1 while a purge of 1M old runs
# proceeds, on SQLite and PostgreSQL:
#   bench/w10.sh [sqlite|postgres|both]      (default both)
# What it does and why: bench/w10.py. Needs hey and, for PostgreSQL, psql
# and PLUMB_BENCH_POSTGRES (default postgres://postgres@127.0.0.1:5432/postgres).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v hey >/dev/null || { echo "needs hey: apt-get install hey" >&2; exit 1; }
[ -n "${PLUMB_BIN:-}" ] || cargo build --release -q -p plumb-cli
exec python3 bench/w10.py "$@"

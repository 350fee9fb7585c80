#!/usr/bin/env bash
# What one batch's latest-state write costs PostgreSQL, next to the batch's
# own rows (BENCHMARKS.md, "Latest state"): pgbench runs, on one connection,
# 60 transactions of each script in scripts/sql/state-*.sql against a state
# table of 10,000 devices:
#   state-stage-only     fill the temporary staging table (≈ 3,900 distinct
#                        devices drawn from 5,000 events), nothing else
#   state-upsert         the same, then ingestd's INSERT … ON CONFLICT DO UPDATE
#   state-merge          the same, then a MERGE (PostgreSQL 15) instead
#   state-events-insert  5,000 event rows into an events-like table
# The upsert's own cost is state-upsert minus state-stage-only.
#
#   scripts/state-sql-bench.sh [DATABASE_URL]   (default: $INGESTD_DATABASE_URL)
# Creates and drops the tables sb_state and sb_events in that database.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
url="${1:-${INGESTD_DATABASE_URL:-}}"
[ -n "$url" ] || { echo "usage: $0 DATABASE_URL" >&2; exit 64; }
pgbench="$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | tail -1)"
[ -x "$pgbench" ] || { echo "pgbench not found (Debian: postgresql-<version>)" >&2; exit 69; }
psql "$url" -q -v ON_ERROR_STOP=1 -f "$here/sql/state-setup.sql" 2>/dev/null
for script in state-stage-only state-upsert state-merge state-events-insert; do
  ms=$("$pgbench" -n -f "$here/sql/$script.sql" -t 60 -c 1 "$url" 2>/dev/null | awk '/latency average/ {print $4}')
  printf '%-20s %8s ms per transaction\n' "$script" "$ms"
done
psql "$url" -q -c 'DROP TABLE sb_state; DROP TABLE sb_events' >/dev/null

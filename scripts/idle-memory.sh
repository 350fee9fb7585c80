#!/usr/bin/env bash
# Memory of idle connections (issue 3, target 4): starts a private
# PostgreSQL and ingestd, reads ingestd's RSS idle, then with N idle
# keep-alive HTTP connections (each after one request), then with N idle
# WebSocket subscribers, and prints bytes per connection.
#   scripts/idle-memory.sh [N]        (default 10000)
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
n=${1:-10000}
source scripts/lib/pg.sh
pg_ensure_installed
dir=$(mktemp -d /tmp/ingestd-mem.XXXXXX)
cleanup() { [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null; wait 2>/dev/null || true; pg_stop "$dir/pg" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
url=$(pg_start "$dir/pg" "$(pg_free_port)")
cargo build --release --quiet
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
target/release/ingestd --config tuning/default.toml --listen 127.0.0.1:0 --database-url "$url" \
  --set server.max_connections=$((n * 3)) --set websocket.max_per_ip=$((n * 2)) >"$dir/out" 2>"$dir/err" &
pid=$!
for _ in $(seq 100); do grep -q listening "$dir/out" && break; sleep 0.1; done
addr=$(sed -n 's/.*http:\/\///p' "$dir/out")
sleep 1
echo "ingestd idle RSS: $(awk '/VmRSS/ {print $2}' /proc/$pid/status) KiB ($(nproc) shards, default profile)"
python3 scripts/idle_memory.py "$addr" "$pid" "$n" http
python3 scripts/idle_memory.py "$addr" "$pid" "$n" ws

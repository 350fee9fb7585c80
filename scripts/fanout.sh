#!/usr/bin/env bash
# WebSocket fan-out figures (issue 4): starts a private PostgreSQL and
# ingestd (tuning/default.toml), then for each scenario opens real WebSocket
# subscribers with ingestd-fanout, ingests at a fixed rate, and prints events
# delivered per second, received_at -> delivery latency (client clock) and
# ingestd's commit -> frame-written latency (server side).
# A scenario with a third word "rooms" (issue 13) gives each subscriber a
# room of its own: it opens a plain /ws, joins device room-<i> with a control
# frame, and the events are spread over those devices (each delivered once).
#   scripts/fanout.sh                        # default scenarios
#   scripts/fanout.sh --rooms                # 1,000 rooms: "1000 500 rooms" "1000 20000 rooms"
#   scripts/fanout.sh "SUBS RATE [rooms]"... # e.g. "100 5000" "1000 500" "50 2000 rooms"
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
scenarios=("$@")
if [ "${1:-}" = "--rooms" ]; then
  scenarios=("1000 500 rooms" "1000 20000 rooms")
fi
[ ${#scenarios[@]} -gt 0 ] || scenarios=("10 20000" "100 5000" "1000 500")
duration=${FANOUT_DURATION:-10}
source scripts/lib/pg.sh
pg_ensure_installed
dir=$(mktemp -d /tmp/ingestd-fanout.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; wait 2>/dev/null || true; pg_stop "$dir/pg" >/dev/null 2>&1 || true; rm -rf "$dir"; }
trap cleanup EXIT
url=$(pg_start "$dir/pg" "$(pg_free_port)")
cargo build --release --quiet --bin ingestd --bin ingestd-fanout
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for s in "${scenarios[@]}"; do
  read -r subs rate mode <<<"$s"
  rooms=()
  case "${mode:-}" in
    "") ;;
    rooms) rooms=(--rooms) ;;
    *) echo "unknown scenario mode '$mode' in '$s' (want: SUBS RATE [rooms])" >&2; exit 64 ;;
  esac
  # A fresh ingestd per scenario, so its latency histogram is this run's.
  target/release/ingestd --config tuning/default.toml --listen 127.0.0.1:0 --database-url "$url" \
    --set database.table="fanout_$subs${mode:+_$mode}" >"$dir/out" 2>"$dir/err" &
  pid=$!
  for _ in $(seq 100); do grep -q listening "$dir/out" && break; sleep 0.1; done
  addr=$(sed -n 's/.*http:\/\///p' "$dir/out")
  echo "== $subs subscribers${mode:+ in $subs rooms}, $rate events/s for ${duration}s: target/release/ingestd-fanout --addr $addr --subscribers $subs --rate $rate --duration $duration ${rooms[*]}"
  target/release/ingestd-fanout --addr "$addr" --subscribers "$subs" --rate "$rate" --duration "$duration" "${rooms[@]}"
  echo "ingestd RSS after: $(awk '/VmRSS/ {print $2}' /proc/$pid/status) KiB"
  kill -TERM "$pid"; wait "$pid" || true; pid=
done

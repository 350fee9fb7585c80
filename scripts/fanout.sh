#!/usr/bin/env bash
# WebSocket fan-out figures (issue 4): starts a private PostgreSQL and
# ingestd (tuning/default.toml), then for each scenario opens real WebSocket
# subscribers with ingestd-fanout, ingests at a fixed rate, and prints events
# delivered per second, received_at -> delivery latency (client clock),
# ingestd's commit -> frame-written latency (server side) and the CPU ingestd
# used during the ingest (cores).
# A scenario with a third word "rooms" (issue 13) gives each subscriber a
# room of its own: it opens a plain /ws, joins device room-<i> with a control
# frame, and the events are spread over those devices (each delivered once).
# With --cluster redis|nats (issue 16), three ingestd instances share one
# table and one live feed through a private redis-server or nats-server
# (scripts/lib/bus.sh; installed from Debian packages when missing): the
# subscribers are spread over the three, so are the events (each instance
# takes a third of the rate), every subscriber should receive every event
# wherever it was sent, and the CPU of each instance and of the bus server is
# printed. The instances do not pin cores (they share them).
#   scripts/fanout.sh                        # default scenarios
#   scripts/fanout.sh --rooms                # 1,000 rooms: "1000 500 rooms" "1000 20000 rooms"
#   scripts/fanout.sh "SUBS RATE [rooms]"... # e.g. "100 5000" "1000 500" "50 2000 rooms"
#   scripts/fanout.sh --cluster redis ["SUBS RATE [rooms]"...]   # default "30 3000" "300 1000"
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
cluster=
if [ "${1:-}" = "--cluster" ]; then
  cluster=${2:-}
  case "$cluster" in
    redis | nats) ;;
    *) echo "usage: scripts/fanout.sh --cluster redis|nats [\"SUBS RATE [rooms]\"...]" >&2; exit 64 ;;
  esac
  shift 2
fi
scenarios=("$@")
if [ "${1:-}" = "--rooms" ]; then
  scenarios=("1000 500 rooms" "1000 20000 rooms")
fi
if [ ${#scenarios[@]} -eq 0 ]; then
  if [ -n "$cluster" ]; then scenarios=("30 3000" "300 1000"); else scenarios=("10 20000" "100 5000" "1000 500"); fi
fi
duration=${FANOUT_DURATION:-10}
# shellcheck source-path=SCRIPTDIR source=lib/pg.sh
source scripts/lib/pg.sh
# shellcheck source-path=SCRIPTDIR source=lib/bus.sh
source scripts/lib/bus.sh
pg_ensure_installed
case "$cluster" in
  redis) redis_ensure_installed ;;
  nats) nats_ensure_installed ;;
esac
dir=$(mktemp -d /tmp/ingestd-fanout.XXXXXX)
pids=()
stop_instances() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_instances
  [ -n "$cluster" ] && { "${cluster}_stop" "$dir/bus" || true; }
  pg_stop "$dir/pg" >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
url=$(pg_start "$dir/pg" "$(pg_free_port)")
bus_url=
if [ -n "$cluster" ]; then
  bus_url=$("${cluster}_start" "$dir/bus" "$(bus_free_port)")
fi
cargo build --release --quiet --bin ingestd --bin ingestd-fanout
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"

# start_instance N TABLE ARGS...: ingestd number N in the background (its pid
# appended to pids); sets addr once it is listening. Not in a subshell: the
# caller keeps the pid.
start_instance() {
  local n=$1 table=$2
  addr=
  shift 2
  target/release/ingestd --config tuning/default.toml --listen 127.0.0.1:0 --database-url "$url" \
    --set database.table="$table" "$@" >"$dir/out$n" 2>"$dir/err$n" &
  pids+=("$!")
  for _ in $(seq 100); do grep -q listening "$dir/out$n" && break; sleep 0.1; done
  addr=$(sed -n 's/.*http:\/\///p' "$dir/out$n")
  [ -n "$addr" ] || { echo "ingestd $n did not start; its stderr:" >&2; tail -n 20 "$dir/err$n" >&2; exit 1; }
}

for s in "${scenarios[@]}"; do
  read -r subs rate mode <<<"$s"
  rooms=()
  case "${mode:-}" in
    "") ;;
    rooms) rooms=(--rooms) ;;
    *) echo "unknown scenario mode '$mode' in '$s' (want: SUBS RATE [rooms])" >&2; exit 64 ;;
  esac
  table="fanout_$subs${mode:+_$mode}${cluster:+_$cluster}"
  # Fresh instances per scenario, so their latency histograms are this run's.
  addrs=() watch=()
  if [ -z "$cluster" ]; then
    start_instance 0 "$table"
    addrs+=("$addr")
    watch+=(--watch "ingestd=${pids[0]}")
  else
    channel="ingestd.fanout.$$.$subs"
    for n in 0 1 2; do
      start_instance "$n" "$table" --set server.pin_cores=false --set cluster.feed="$cluster" \
        --set cluster.url="$bus_url" --set cluster.channel="$channel"
      addrs+=("$addr")
      watch+=(--watch "ingestd-$n=${pids[$n]}")
    done
    watch+=(--watch "$cluster-server=$(bus_pid "$dir/bus" "$cluster")")
    # Redis pub/sub keeps nothing for a subscriber not yet there: wait until
    # every instance has the bus up before measuring.
    for a in "${addrs[@]}"; do
      for _ in $(seq 200); do
        curl -fsS "http://$a/health" 2>/dev/null | grep -q '"bus":"up"' && break
        sleep 0.1
      done
      curl -fsS "http://$a/health" | grep -q '"bus":"up"' || { echo "ingestd at $a: the $cluster bus is not up" >&2; exit 1; }
    done
  fi
  addr_args=()
  for a in "${addrs[@]}"; do addr_args+=(--addr "$a"); done
  echo "== $subs subscribers${mode:+ in $subs rooms}${cluster:+ over 3 instances ($cluster)}, $rate events/s for ${duration}s: target/release/ingestd-fanout ${addr_args[*]} --subscribers $subs --rate $rate --duration $duration ${rooms[*]} ${watch[*]}"
  target/release/ingestd-fanout "${addr_args[@]}" --subscribers "$subs" --rate "$rate" --duration "$duration" \
    "${rooms[@]}" "${watch[@]}"
  for p in "${pids[@]}"; do echo "ingestd (pid $p) RSS after: $(awk '/VmRSS/ {print $2}' "/proc/$p/status") KiB"; done
  if [ -n "$cluster" ]; then
    echo "$cluster-server RSS after: $(awk '/VmRSS/ {print $2}' "/proc/$(bus_pid "$dir/bus" "$cluster")/status") KiB"
  fi
  stop_instances
done

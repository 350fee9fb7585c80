#!/usr/bin/env bash
# Build and run ingestd.
#
#   scripts/run.sh [INGESTD ARGS...]
#
# Without a database URL (neither INGESTD_DATABASE_URL nor --database-url),
# PostgreSQL is installed from Debian packages if missing, a private cluster
# is started under .pgdata/ in the repository (port 54329, or a free one,
# remembered in .pgdata/port), database "ingestd" is created in it, and
# ingestd is pointed at it. The cluster keeps running after ingestd exits;
# stop it with scripts/pg-stop.sh.
#
# Every argument is passed on to ingestd, e.g.
#   scripts/run.sh --listen 0.0.0.0:8080 --set auth.mode=off --set writer.writers=4
# (a listener beyond loopback needs auth.mode said explicitly; see [auth]).
# Unless --config is given, tuning/default.toml is used.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

have_url="" have_config="" config=tuning/default.toml listen=""
prev=""
for a in "$@"; do
    case $prev in
        --config) config=$a ;;
        --listen) listen=$a ;;
    esac
    case $a in
        --database-url | --database-url=*) have_url=1 ;;
        --config) have_config=1 ;;
        --config=*) have_config=1; config=${a#--config=} ;;
        --listen=*) listen=${a#--listen=} ;;
    esac
    prev=$a
done
[[ -n ${INGESTD_DATABASE_URL:-} ]] && have_url=1

args=()
if [[ -z $have_config ]]; then
    if [[ -f $config ]]; then
        args+=(--config "$config")
    else
        echo "run.sh: $config not found; running with built-in defaults" >&2
        config=""
    fi
fi

if [[ -z $have_url ]]; then
    # shellcheck source-path=SCRIPTDIR source=lib/pg.sh
    . "$ROOT/scripts/lib/pg.sh"
    pg_ensure_installed
    pgroot=$ROOT/.pgdata
    mkdir -p "$pgroot"
    port=""
    if pg_running "$pgroot/data"; then
        port=$(pg_running_port "$pgroot/data")
    else
        [[ -f $pgroot/port ]] && port=$(<"$pgroot/port")
        if [[ ! $port =~ ^[0-9]+$ ]] || ! pg_port_free "$port"; then
            if pg_port_free 54329; then port=54329; else port=$(pg_free_port); fi
        fi
    fi
    url=$(pg_start "$pgroot/data" "$port")
    port=${url##*:}; port=${port%%/*}
    echo "$port" >"$pgroot/port"
    url=$(pg_ensure_database "$url" ingestd)
    echo "run.sh: private PostgreSQL at $url (stop it with scripts/pg-stop.sh)" >&2
    args+=(--database-url "$url")
fi

echo "run.sh: cargo build --release" >&2
cargo build --release

# Where ingestd will listen: --listen, else INGESTD_LISTEN, else the config file.
if [[ -z $listen ]]; then listen=${INGESTD_LISTEN:-}; fi
if [[ -z $listen && -n $config && -f $config ]]; then
    listen=$(awk '
        /^[[:space:]]*\[/ { sec = $0; gsub(/[][[:space:]]/, "", sec); next }
        sec == "server" && /^[[:space:]]*listen[[:space:]]*=/ {
            v = $0; sub(/^[^=]*=[[:space:]]*"/, "", v); sub(/".*$/, "", v); print v; exit
        }' "$config")
fi
listen=${listen:-127.0.0.1:8080}
host=${listen%:*} lport=${listen##*:}
case $host in 0.0.0.0 | "[::]" | "") host=127.0.0.1 ;; esac
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)

cat >&2 <<EOF

ingestd will listen on http://$listen (it prints "ingestd listening on ..." when ready).
Try, from another terminal:
  curl -s -XPOST $host:$lport/events -H 'content-type: application/json' -d '{"device_id":"d1","type":"boot","ts":"$now","payload":{"v":1}}'
  curl -s $host:$lport/stats
Stop with Ctrl-C (graceful: drains and commits everything accepted).

EOF

exec target/release/ingestd "${args[@]}" "$@"

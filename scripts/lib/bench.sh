# Shared by scripts/bench.sh and scripts/stall-bench.sh (sourced, not run):
# logging, clearing INGESTD_* from the caller's shell, the private
# PostgreSQL (scripts/lib/pg.sh) and ingestd stopped on exit, the build, and
# number formatting. Expects ROOT, out (an absolute results directory),
# build (non-empty to build) and bench_name; sets INGESTD, LOAD, pgtmp and
# ingestd_pid (fill the last two in when you start them).
# shellcheck shell=bash disable=SC2034

step() { printf '\n==> %s\n' "$*" >&2; }
log() { printf '%s: %s\n' "$bench_name" "$*" >&2; }

# Settings from the caller's shell must not leak into ingestd (only --set does).
while IFS= read -r v; do
    case $v in INGESTD_PG_*) ;; *) unset "$v" ;; esac
done < <(compgen -e | grep '^INGESTD_' || true)

# shellcheck source-path=SCRIPTDIR source=lib/pg.sh
. "$ROOT/scripts/lib/pg.sh"

pgtmp="" ingestd_pid=""
cleanup() {
    local rc=$?
    if [[ -n $ingestd_pid ]] && kill -0 "$ingestd_pid" 2>/dev/null; then
        kill -TERM "$ingestd_pid" 2>/dev/null || true
        for _ in $(seq 1 300); do kill -0 "$ingestd_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$ingestd_pid" 2>/dev/null || true
    fi
    if [[ -n $pgtmp ]]; then
        pg_stop "$pgtmp/data" || true
        cp "$pgtmp/data/log/postgres.log" "$out/postgres.log" 2>/dev/null || true
        rm -rf -- "$pgtmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n $build ]]; then
    step "cargo build --release --bins"
    cargo build --release --bins
fi
INGESTD=$ROOT/target/release/ingestd
LOAD=$ROOT/target/release/ingestd-load
[[ -x $INGESTD && -x $LOAD ]] || { echo "$bench_name: build the binaries first (cargo build --release --bins)" >&2; exit 1; }
get() { "$LOAD" get "$@"; }
# fmt N: integer with thousands separators.
fmt() { awk -v n="$1" 'BEGIN { s = sprintf("%.0f", n); r = ""; while (length(s) > 3) { r = "," substr(s, length(s) - 2) r; s = substr(s, 1, length(s) - 3) } print s r }'; }
# fix DIGITS N: N rounded.
fix() { awk -v d="$1" -v n="$2" 'BEGIN { printf "%.*f", d, n }'; }

addr="" idle_rss_kib=0 stopped_rc=""
[[ -v app ]] || app=()
# start_ingestd TABLE NAME: start ingestd ($config, --set "${sets[@]}", under
# "${app[@]}" if set) writing TABLE; its output in $out/NAME.*
start_ingestd() {
    "${app[@]}" "$INGESTD" --config "$config" --listen 127.0.0.1:0 --database-url "$url" \
        --set "database.table=$1" "${sets[@]}" >"$out/$2.stdout" 2>"$out/$2.log" &
    ingestd_pid=$!
    addr=""
    for _ in $(seq 1 600); do
        addr=$(sed -n 's/^ingestd listening on \(http:\/\/[^ ]*\).*/\1/p' "$out/$2.stdout" | head -n 1)
        [[ -n $addr ]] && break
        kill -0 "$ingestd_pid" 2>/dev/null || { tail -n 30 "$out/$2.log" >&2; echo "$bench_name: ingestd exited at start" >&2; exit 1; }
        sleep 0.1
    done
    [[ -n $addr ]] || { tail -n 30 "$out/$2.log" >&2; echo "$bench_name: ingestd did not report readiness" >&2; exit 1; }
    sleep 0.5
    idle_rss_kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$ingestd_pid/status")
    log "ingestd pid $ingestd_pid listening on $addr; idle RSS $((idle_rss_kib / 1024)) MiB"
}
# stop_ingestd: SIGTERM, wait; the exit code goes into $stopped_rc.
stop_ingestd() {
    kill -TERM "$ingestd_pid"
    set +e
    wait "$ingestd_pid"
    stopped_rc=$?
    set -e
    ingestd_pid=""
}
# http_get PATH: body of a GET to ingestd (bash /dev/tcp; no curl needed).
http_get() {
    local hp=${addr#http://} body
    exec 3<>"/dev/tcp/${hp%:*}/${hp##*:}" || return 1
    printf 'GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$1" "$hp" >&3
    body=$(cat <&3)
    exec 3<&-
    printf '%s\n' "${body#*$'\r\n\r\n'}"
}

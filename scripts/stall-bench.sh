#!/usr/bin/env bash
# Load shedding on a deliberately slow PostgreSQL: ingestd under more load
# than its database can commit, showing the fast 503s of ingest.max_wait_ms.
#
#   scripts/stall-bench.sh [OPTIONS]
#
# What it does, from a clean clone with no arguments (≈ 1 minute here):
#   1. cargo build --release --bins (ingestd and ingestd-load; not with --no-build)
#   2. starts a private PostgreSQL in a temporary directory (installed from
#      Debian packages if missing; scripts/lib/pg.sh, its default settings)
#   3. creates the table stall_events with the SPEC's columns and a
#      BEFORE INSERT FOR EACH ROW trigger doing PERFORM pg_sleep(--row-sleep):
#      COPY fires it too, so each writer commits at most 1/row-sleep rows/s
#      (default 0.0005 s: about 100x slower per row than plain COPY here)
#   4. starts ingestd from tuning/<profile>.toml on 127.0.0.1:0 writing that
#      table (--set options passed on)
#   5. closed-loop load: `ingestd-load http`, --concurrency connections ×
#      POST /events/batch of --batch-size events, --warmup + --duration
#      seconds; a connection that gets a 503 waits --pause-after-503 ms before
#      its next request (a device backing off); samples ingestd's CPU and RSS
#   6. saves ingestd's /stats, SIGTERMs it (expects exit code 0), checks that
#      SELECT count(*) equals the events acknowledged (warm-up included)
#   7. stops PostgreSQL, removes the temporary directory, and prints a summary
#      plus a markdown table row for BENCHMARKS.md
#
# Reported: latency of the requests answered 200 (p50/p99/max: should stay
# near ingest.max_wait_ms + one commit), the share of requests answered 503
# and how fast those came (p50/p99), events/s committed (the ceiling is about
# writer.writers / row-sleep, less pg_sleep's own overhead per row), and
# ingestd's peak RSS.
#
# Results: bench-results/stall-<UTC timestamp>/ (gitignored): summary.md,
# load/result.json and its SVG plots, load.txt, ingestd's log, stdout and
# /stats, ingestd-effective-config.toml, PostgreSQL's log.
#
# OPTIONS (environment variable in brackets)
#   --row-sleep S          seconds pg_sleep'd per inserted row (default 0.0005) [STALL_ROW_SLEEP]
#   --profile NAME         tuning/NAME.toml (default: default) [STALL_PROFILE]
#   --concurrency C        closed-loop connections (default 160) [STALL_CONCURRENCY]
#   --batch-size N         events per request (default 100) [STALL_BATCH_SIZE]
#   --duration S           measured seconds (default 15) [STALL_DURATION]
#   --warmup S             unmeasured seconds first (default 2) [STALL_WARMUP]
#   --pause-after-503 MS   a connection's pause after a 503 (default 50) [STALL_PAUSE_AFTER_503]
#   --timeout S            ingestd-load's connect/read/write timeout (default 30) [STALL_TIMEOUT]
#   --set section.key=V    passed on to ingestd (repeatable), e.g. --set ingest.max_wait_ms=500
#   --out DIR              results directory (default bench-results/stall-<timestamp>) [STALL_OUT]
#   --no-build             use the binaries already in target/release
#   -h, --help
#
# The load generator, ingestd and PostgreSQL share this machine's cores; the
# trigger's sleeps use no CPU, so the database is slow, not busy.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

row_sleep=${STALL_ROW_SLEEP:-0.0005}
profile=${STALL_PROFILE:-default}
concurrency=${STALL_CONCURRENCY:-160}
batch=${STALL_BATCH_SIZE:-100}
duration=${STALL_DURATION:-15}
warmup=${STALL_WARMUP:-2}
pause503=${STALL_PAUSE_AFTER_503:-50}
timeout=${STALL_TIMEOUT:-30}
out=${STALL_OUT:-}
build=1
sets=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n $2 ]] || { echo "stall-bench.sh: $1 needs a value" >&2; exit 64; }; }
while (($#)); do
    case $1 in
        --row-sleep) need "$@"; row_sleep=$2; shift ;;
        --profile) need "$@"; profile=$2; shift ;;
        --concurrency) need "$@"; concurrency=$2; shift ;;
        --batch-size) need "$@"; batch=$2; shift ;;
        --duration) need "$@"; duration=$2; shift ;;
        --warmup) need "$@"; warmup=$2; shift ;;
        --pause-after-503) need "$@"; pause503=$2; shift ;;
        --timeout) need "$@"; timeout=$2; shift ;;
        --set) need "$@"; sets+=(--set "$2"); shift ;;
        --out) need "$@"; out=$2; shift ;;
        --no-build) build="" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "stall-bench.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
for v in concurrency batch duration warmup pause503 timeout; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "stall-bench.sh: --${v/pause503/pause-after-503} must be a whole number" >&2; exit 64; }
done
((concurrency >= 1 && batch >= 1 && duration >= 1 && timeout >= 1)) \
    || { echo "stall-bench.sh: --concurrency, --batch-size, --duration and --timeout must be at least 1" >&2; exit 64; }
[[ $row_sleep =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || { echo "stall-bench.sh: --row-sleep must be a number of seconds, e.g. 0.0005" >&2; exit 64; }

config=tuning/$profile.toml
[[ -f $config ]] || { echo "stall-bench.sh: no profile $config (have: $(cd tuning && printf '%s ' *.toml))" >&2; exit 64; }
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=${out:-bench-results/stall-$stamp}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
bench_name=stall-bench.sh
. "$ROOT/scripts/lib/bench.sh"
# div A B [DIGITS]
div() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { printf "%.*f", d, (b > 0 ? a / b : 0) }'; }

table=stall_events
# (--check-config wants a URL; the real one is not known yet and is not used.)
effective=$("$INGESTD" --check-config --config "$config" --database-url postgres://bench@127.0.0.1:1/bench \
    --set "database.table=$table" "${sets[@]}")
printf '%s\n' "$effective" >"$out/ingestd-effective-config.toml"
# toml_get SECTION KEY: a value of the effective config.
toml_get() {
    printf '%s\n' "$effective" | awk -v sec="$1" -v key="$2" '
        /^[[:space:]]*\[/ { s = $0; gsub(/[][[:space:]]/, "", s); next }
        s == sec && $1 == key { v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); gsub(/"/, "", v); print v; exit }'
}
writers=$(toml_get writer writers)
max_wait=$(toml_get ingest max_wait_ms)
ack=$(toml_get ingest ack)
stmt_timeout=$(toml_get database statement_timeout_ms)
[[ $writers =~ ^[0-9]+$ ]] || { echo "stall-bench.sh: cannot read writer.writers from $config" >&2; exit 1; }
# Nominal: pg_sleep's overhead per call makes the real ceiling lower (see "commits" in the summary).
ceiling=$(awk -v w="$writers" -v s="$row_sleep" 'BEGIN { printf "%.0f", (s > 0 ? w / s : 0) }')
log "profile $config: writers=$writers ack=$ack max_wait_ms=${max_wait:-?} statement_timeout_ms=${stmt_timeout:-?}; results in $out"
if [[ -n $stmt_timeout ]] && awk -v s="$row_sleep" -v t="$stmt_timeout" -v b="$(toml_get writer max_batch_events)" \
    'BEGIN { exit !(s * b * 1000 > t) }'; then
    log "NOTE: a full batch of writer.max_batch_events rows would sleep longer than database.statement_timeout_ms"
fi

step "PostgreSQL (private cluster) and table $table: pg_sleep($row_sleep) per inserted row"
pg_ensure_installed
pgtmp=$(mktemp -d "${TMPDIR:-/tmp}/ingestd-stall-pg.XXXXXX")
chmod 755 "$pgtmp"
port=$(pg_free_port)
url=$(pg_start "$pgtmp/data" "$port")
pg_version=$(pg_psql "$url" -tAc "SHOW server_version")
pg_psql "$url" \
    -c "CREATE TABLE $table (
            event_id    text PRIMARY KEY,
            device_id   text        NOT NULL,
            event_type  text        NOT NULL,
            ts          timestamptz NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            payload     jsonb)" \
    -c "CREATE FUNCTION stall_row() RETURNS trigger LANGUAGE plpgsql AS
            \$\$ BEGIN PERFORM pg_sleep($row_sleep); RETURN NEW; END \$\$" \
    -c "CREATE TRIGGER stall_row BEFORE INSERT ON $table FOR EACH ROW EXECUTE FUNCTION stall_row()"
log "PostgreSQL $pg_version at $url; nominal ceiling $writers writers / $row_sleep s = $(fmt "$ceiling") rows/s"

step "ingestd ($config, table $table${sets[*]:+, ${sets[*]}})"
start_ingestd "$table" ingestd


step "load: $concurrency connections × POST /events/batch of $batch events, ${warmup}s + ${duration}s, ${pause503} ms pause after a 503"
"$LOAD" http --url "$addr" --concurrency "$concurrency" --batch-size "$batch" \
    --duration "$duration" --warmup "$warmup" --pause-after-503 "$pause503" --timeout "$timeout" \
    --watch "ingestd=$ingestd_pid" --out "$out/load" | tee "$out/load.txt"
http_get /stats >"$out/ingestd-stats.json" 2>/dev/null || true

step "SIGTERM ingestd; count(*) against the acknowledged events"
stop_ingestd
rc=$stopped_rc
rows=$(pg_psql "$url" -tAc "SELECT count(*) FROM $table")

L=$out/load/result.json
S=$out/ingestd-stats.json
# stat KEY.PATH: a value of ingestd's /stats, or "?".
stat() { get "$S" "$1" 2>/dev/null || echo "?"; }
expect=$(get "$L" totals_with_warmup.unique_events_acked)
requests=$(get "$L" totals.requests)
n200=$(get "$L" totals.status.200 2>/dev/null || echo 0)
n503=$(get "$L" totals.status.503 2>/dev/null || echo 0)
errors=$(get "$L" totals.errors)
measured_s=$(get "$L" measured_s)
other=$(($(get "$L" totals.requests) - n200 - n503 - errors))
pct503=$(awk -v a="$n503" -v b="$requests" 'BEGIN { printf "%.1f", (b > 0 ? 100 * a / b : 0) }')
eps=$(get "$L" rates.events_per_s_acked)
p50=$(get "$L" latency_ms.p50) p99=$(get "$L" latency_ms.p99) pmax=$(get "$L" latency_ms.max)
q50=$(get "$L" latency_503_ms.p50) q99=$(get "$L" latency_503_ms.p99) qmax=$(get "$L" latency_503_ms.max)
rss=$(fix 0 "$(get "$L" processes.ingestd.rss_peak_mib)") hwm=$(fix 0 "$(get "$L" processes.ingestd.vm_hwm_mib)")
cpu=$(get "$L" processes.ingestd.cores_avg)
shed_est=$(stat shed_by_reason.wait_estimate) shed_exp=$(stat shed_by_reason.wait_expired)
shed_other=$(awk -v a="$(stat shed_by_reason.ring_full)" -v b="$(stat shed_by_reason.breaker_open)" \
    -v c="$(stat shed_by_reason.memory_budget)" 'BEGIN { print a + b + c }')
commit_p50=$(stat commit_latency_ms.p50) commit_p99=$(stat commit_latency_ms.p99)
batch_mean=$(fix 0 "$(stat batch_events.mean)" 2>/dev/null || echo "?")
batch_failures=$(stat batch_failures) breaker_opens=$(stat breaker_opens)
# What a row really cost: pg_sleep's own overhead comes on top of --row-sleep.
row_ms=$(awk -v c="$commit_p50" -v b="$(stat batch_events.mean)" 'BEGIN { if (b + 0 > 0 && c + 0 > 0) printf "%.2f", c / b; else print "?" }')
if [[ $rows == "$expect" ]]; then count_text="$(fmt "$rows") = acknowledged"; count_ok=1; else count_text="$(fmt "$rows") ≠ $(fmt "$expect") acknowledged"; count_ok=""; fi
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)")
git_dirty=""
if git rev-parse --git-dir >/dev/null 2>&1 && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    git_dirty=" + uncommitted changes"
fi
cmd="scripts/stall-bench.sh --row-sleep $row_sleep --profile $profile --concurrency $concurrency --batch-size $batch --duration $duration --warmup $warmup --pause-after-503 $pause503${sets[*]:+ ${sets[*]}}"
rel=${out#"$ROOT"/}

{
    echo "### ingestd on a slow database (pg_sleep($row_sleep) per row) — $stamp"
    echo
    echo "Machine: $(nproc) × $(get "$L" machine.cpu_model), $(get "$L" machine.mem_total_gib) GiB; PostgreSQL $pg_version (scripts/lib/pg.sh settings)."
    echo "ingestd $git_rev$git_dirty, profile \`$config\` (writers=$writers, ack=$ack, ingest.max_wait_ms=${max_wait:-?})."
    echo "Command: \`$cmd\`"
    echo
    echo "| row sleep (nominal ceiling) | load | events/s committed | 200: p50 / p99 / max ms | 503: share (per s) | 503: p50 / p99 ms | ingestd RSS peak (VmHWM) | commits p50 / p99 ms, batch mean | count(*) = acked, exit |"
    echo "|---|---|---:|---|---|---|---|---|---|"
    echo "| ${row_sleep} s ($(fmt "$ceiling") rows/s) | $concurrency conn × $batch, ${pause503} ms pause after 503 | $(fmt "$eps") | $(fix 1 "$p50") / $(fix 1 "$p99") / $(fix 1 "$pmax") | ${pct503}% ($(fmt "$(div "$n503" "$measured_s" 0)")/s) | $(fix 2 "$q50") / $(fix 2 "$q99") | $rss ($hwm) MiB | $(fix 0 "$commit_p50") / $(fix 0 "$commit_p99"), $batch_mean | $([[ -n $count_ok ]] && echo yes || echo "NO: $count_text"), $rc |"
    echo
    echo "503s by reason (ingestd /stats, warm-up included): wait_estimate $shed_est, wait_expired $shed_exp, other $shed_other; batch failures $batch_failures, breaker opens $breaker_opens; other statuses $other, transport errors $errors."
    echo "Plots: \`$rel/load/latency.svg\`, \`$rel/load/throughput.svg\`."
} >"$out/summary.md"

step "summary"
cat <<EOF
slow database       pg_sleep($row_sleep) per row: nominal ceiling $(fmt "$ceiling") rows/s with $writers writers (ingest.max_wait_ms ${max_wait:-?})
load                $concurrency connections × $batch events, ${pause503} ms pause after a 503, ${warmup}s + ${duration}s
committed           $(fmt "$eps") events/s acknowledged; count(*) $count_text
answered 200        $(fmt "$n200") requests; latency p50 $p50 ms  p99 $p99 ms  max $pmax ms
answered 503        $(fmt "$n503") requests = ${pct503}% of $(fmt "$requests"); latency p50 $q50 ms  p99 $q99 ms  max $qmax ms
                    by reason: wait_estimate $shed_est, wait_expired $shed_exp, other $shed_other
other               other statuses $other, transport errors $errors; batch failures $batch_failures, breaker opens $breaker_opens
commits             p50 $commit_p50 ms  p99 $commit_p99 ms; mean batch $batch_mean events (≈ $row_ms ms per row)
ingestd             $cpu cores; RSS idle $((idle_rss_kib / 1024)) MiB, peak $rss MiB (VmHWM $hwm MiB); exit code $rc after SIGTERM
results             $out

--- markdown for BENCHMARKS.md ($out/summary.md) ---
EOF
cat "$out/summary.md"
if [[ $rc != 0 || -z $count_ok ]]; then
    log "WARNING: ingestd's exit code was not 0, or count(*) did not match the acknowledged events"
    exit 1
fi

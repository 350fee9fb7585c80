#!/usr/bin/env bash
# End-to-end benchmark: ingestd against raw binary COPY, in one run.
#
#   scripts/bench.sh [OPTIONS]
#
# What it does, from a clean clone with no arguments (≈ 2 minutes here):
#   1. cargo build --release --bins (ingestd and ingestd-load)
#   2. starts a private PostgreSQL in a temporary directory (installed from
#      Debian packages if missing; scripts/lib/pg.sh) with benchmark settings:
#      fsync on, synchronous_commit on, shared_buffers 1GB, max_wal_size 8GB,
#      min_wal_size 4GB, checkpoint_timeout 15min (no checkpoint inside a
#      measured phase: each starts right after a CHECKPOINT), autovacuum on
#      (logged and counted per phase)
#   3. warms it up: COPYs --warmup-rows rows into a throw-away table and drops
#      it, and pre-creates 4 GB of WAL segments (a fresh cluster is ~40% slower
#      until its WAL segments exist), then CHECKPOINT
#   4. --repeat times, alternating, each on a fresh table after a CHECKPOINT,
#      each --warmup + --duration seconds:
#      a. raw COPY reference: `ingestd-load copy-baseline` with as many
#         connections as the profile's writer.writers, 5000 rows per
#         transaction, the same generated events (as many id streams as load
#         connections) encoded by ingestd's own parser, pre-generated
#      b. ingestd from tuning/<profile>.toml on 127.0.0.1:0 under closed-loop
#         load: `ingestd-load http`, POST /events/batch × 100 events,
#         --concurrency connections, sampling CPU and RSS of ingestd, of all
#         PostgreSQL processes and of the load generator itself; then SIGTERM
#         (expects exit code 0) and SELECT count(*) against the acknowledged
#         events
#   5. with --sweep: a new ingestd on a fresh table, open-loop steps at
#      fractions of the median closed-loop rate (throughput vs latency curve),
#      then the latency floor at 50 %: raw COPY, open loop at the same rate
#      (`copy-baseline --event-rate`), latency from arrival to COMMIT
#   6. stops PostgreSQL, removes the temporary directory, and prints a summary
#      (medians over the repetitions) plus a markdown snippet for BENCHMARKS.md
#
# Storage on small VMs is noisy (here raw COPY varied 185k-290k rows/s from
# one 10 s run to the next): that is why the two sides alternate and medians
# are reported, with every repetition listed.
#
# Results: bench-results/<UTC timestamp>/ (gitignored): summary.md, the
# result.json and SVG plots of every phase, ingestd's logs and /stats, and
# PostgreSQL's log (checkpoints, autovacuum runs).
#
# OPTIONS (environment variable in brackets)
#   --profile NAME         tuning/NAME.toml (default: default) [BENCH_PROFILE]
#   --repeat N             raw COPY / ingestd pairs (default 3) [BENCH_REPEAT]
#   --duration S           measured seconds of each phase (default 10) [BENCH_DURATION]
#   --warmup S             unmeasured seconds before each phase (default 2) [BENCH_WARMUP]
#   --concurrency C        closed-loop connections (default 128: 12,800 events in
#                          flight give the two writers batches near raw COPY's
#                          5,000 rows; 64 gives ~2,000-row batches) [BENCH_CONCURRENCY]
#   --batch-size N         events per request (default 100) [BENCH_BATCH_SIZE]
#   --duplicates P         percent of deliberate duplicate event_ids (default 0) [BENCH_DUPLICATES]
#   --dup-mode M           spread | resend (default spread) [BENCH_DUP_MODE]
#   --ids K                seq | random | none event_ids (default seq; see ingestd-load help) [BENCH_IDS]
#   --devices N            distinct device_ids the events spread over (default 10000);
#                          with --set state.enabled=true this is the size of the
#                          latest-state table the writers upsert [BENCH_DEVICES]
#   --sweep                also run the open-loop sweep [BENCH_SWEEP=1]
#   --sweep-points LIST    fractions in percent (default 10,25,50,75,90,100) [BENCH_SWEEP_POINTS]
#   --sweep-duration S     measured seconds per step, after 2 s of warm-up (default 8) [BENCH_SWEEP_DURATION]
#   --single-shard         run ingestd with server.shards=1 (scaling figure) [BENCH_SINGLE_SHARD=1]
#   --split-cores          PostgreSQL on the upper half of the cores, everything else
#                          (ingestd, the load generator, the raw COPY client) on the
#                          lower half (taskset): the database as if on its own machine,
#                          so the ratio shows whether ingestd keeps it busy instead of
#                          how much CPU ingestd takes from it [BENCH_SPLIT_CORES=1]
#   --baseline-rows N      rows pre-generated for each raw COPY phase (default
#                          320000 per second of warm-up + duration; ≈ 280 bytes of RAM each) [BENCH_BASELINE_ROWS]
#   --warmup-rows N        rows of the cluster warm-up (default 1000000) [BENCH_WARMUP_ROWS]
#   --set section.key=V    passed on to ingestd (repeatable)
#   --out DIR              results directory (default bench-results/<timestamp>) [BENCH_OUT]
#   --quiet-wait S         before each phase, wait up to S seconds for other processes to
#                          leave the machine idle (default 120; 0 = do not wait) [BENCH_QUIET_WAIT]
#   --no-build             use the binaries already in target/release
#   -h, --help
#
# The machine this was written on has 2 cores: the load generator, ingestd and
# PostgreSQL all compete for them. The summary reports each one's CPU.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

profile=${BENCH_PROFILE:-default}
repeat=${BENCH_REPEAT:-3}
duration=${BENCH_DURATION:-10}
warmup=${BENCH_WARMUP:-2}
concurrency=${BENCH_CONCURRENCY:-128}
batch=${BENCH_BATCH_SIZE:-100}
dups=${BENCH_DUPLICATES:-0}
dup_mode=${BENCH_DUP_MODE:-spread}
ids=${BENCH_IDS:-seq}
devices=${BENCH_DEVICES:-10000}
sweep=${BENCH_SWEEP:-}
sweep_points=${BENCH_SWEEP_POINTS:-10,25,50,75,90,100}
sweep_duration=${BENCH_SWEEP_DURATION:-8}
single_shard=${BENCH_SINGLE_SHARD:-}
split_cores=${BENCH_SPLIT_CORES:-}
baseline_rows=${BENCH_BASELINE_ROWS:-}
warmup_rows=${BENCH_WARMUP_ROWS:-1000000}
out=${BENCH_OUT:-}
quiet_wait=${BENCH_QUIET_WAIT:-120}
build=1
sets=()

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
need() { [[ $# -ge 2 && -n $2 ]] || { echo "bench.sh: $1 needs a value" >&2; exit 64; }; }
while (($#)); do
    case $1 in
        --profile) need "$@"; profile=$2; shift ;;
        --repeat) need "$@"; repeat=$2; shift ;;
        --duration) need "$@"; duration=$2; shift ;;
        --warmup) need "$@"; warmup=$2; shift ;;
        --concurrency) need "$@"; concurrency=$2; shift ;;
        --batch-size) need "$@"; batch=$2; shift ;;
        --duplicates) need "$@"; dups=$2; shift ;;
        --dup-mode) need "$@"; dup_mode=$2; shift ;;
        --ids) need "$@"; ids=$2; shift ;;
        --devices) need "$@"; devices=$2; shift ;;
        --sweep) sweep=1 ;;
        --sweep-points) need "$@"; sweep_points=$2; sweep=1; shift ;;
        --sweep-duration) need "$@"; sweep_duration=$2; shift ;;
        --single-shard) single_shard=1 ;;
        --split-cores) split_cores=1 ;;
        --baseline-rows) need "$@"; baseline_rows=$2; shift ;;
        --warmup-rows) need "$@"; warmup_rows=$2; shift ;;
        --set) need "$@"; sets+=(--set "$2"); shift ;;
        --out) need "$@"; out=$2; shift ;;
        --quiet-wait) need "$@"; quiet_wait=$2; shift ;;
        --no-build) build="" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done
for v in repeat duration warmup concurrency batch quiet_wait; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 0 ]] || { echo "bench.sh: --$v must be a whole number" >&2; exit 64; }
done
((repeat >= 1 && duration >= 1 && concurrency >= 1 && batch >= 1)) || { echo "bench.sh: --repeat, --duration, --concurrency and --batch-size must be at least 1" >&2; exit 64; }

config=tuning/$profile.toml
[[ -f $config ]] || { echo "bench.sh: no profile $config (have: $(cd tuning && printf '%s ' *.toml))" >&2; exit 64; }
[[ -n $single_shard ]] && sets+=(--set server.shards=1)
# app: the prefix that confines ingestd and the load tools to their cores.
app=() pg_cpus="" app_cpus=""
if [[ -n $split_cores ]]; then
    ncpu=$(nproc)
    ((ncpu >= 2)) || { echo "bench.sh: --split-cores needs at least 2 cores" >&2; exit 64; }
    command -v taskset >/dev/null || { echo "bench.sh: --split-cores needs taskset (util-linux)" >&2; exit 64; }
    app_cpus="0-$((ncpu - ncpu / 2 - 1))" pg_cpus="$((ncpu - ncpu / 2))-$((ncpu - 1))"
    app=(taskset -c "$app_cpus")
fi
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=${out:-bench-results/$stamp}
mkdir -p "$out"
out=$(cd "$out" && pwd)

# shellcheck source-path=SCRIPTDIR source=lib/bench.sh
bench_name=bench.sh
. "$ROOT/scripts/lib/bench.sh"
# median N...: the median of the arguments.
median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# max N...
maxof() { printf '%s\n' "$@" | sort -g | tail -n 1; }
# div A B [DIGITS]
div() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { printf "%.*f", d, (b > 0 ? a / b : 0) }'; }

# (--check-config wants a URL; the real one is not known yet and is not used.)
effective=$("${app[@]}" "$INGESTD" --check-config --config "$config" --database-url postgres://bench@127.0.0.1:1/bench "${sets[@]}")
printf '%s\n' "$effective" >"$out/ingestd-effective-config.toml"
# toml_get SECTION KEY: a value of the effective config.
toml_get() {
    printf '%s\n' "$effective" | awk -v sec="$1" -v key="$2" '
        /^[[:space:]]*\[/ { s = $0; gsub(/[][[:space:]]/, "", s); next }
        s == sec && $1 == key { v = $0; sub(/^[^=]*=[[:space:]]*/, "", v); gsub(/"/, "", v); print v; exit }'
}
writers=$(toml_get writer writers)
shards=$(toml_get server shards)
ack=$(toml_get ingest ack)
nproc=$(nproc)
if [[ -n $split_cores ]]; then app_nproc=$("${app[@]}" nproc); else app_nproc=$nproc; fi
if [[ $shards == 0 || -z $shards ]]; then shards_eff=$app_nproc; else shards_eff=$shards; fi
[[ $writers =~ ^[0-9]+$ ]] || { echo "bench.sh: cannot read writer.writers from $config" >&2; exit 1; }
log "profile $config: writers=$writers shards=$shards (effective $shards_eff) ack=$ack; results in $out"

step "PostgreSQL (private cluster, benchmark settings)"
pg_ensure_installed
pgtmp=$(mktemp -d "${TMPDIR:-/tmp}/ingestd-bench-pg.XXXXXX")
chmod 755 "$pgtmp"
port=$(pg_free_port)
url=$(pg_start "$pgtmp/data" "$port")
# pg.sh rewrites its own settings at every start; ALTER SYSTEM (postgresql.auto.conf) wins.
pg_psql "$url" -c "ALTER SYSTEM SET shared_buffers = '1GB'" \
    -c "ALTER SYSTEM SET max_wal_size = '8GB'" \
    -c "ALTER SYSTEM SET min_wal_size = '4GB'" \
    -c "ALTER SYSTEM SET checkpoint_timeout = '15min'" \
    -c "ALTER SYSTEM SET log_checkpoints = on" \
    -c "ALTER SYSTEM SET log_autovacuum_min_duration = 0"
pg_stop "$pgtmp/data"
url=$(pg_start "$pgtmp/data" "$port")
postmaster=$(head -n 1 "$pgtmp/data/postmaster.pid")
if [[ -n $split_cores ]]; then
    # Backends fork from the postmaster and inherit its CPU set.
    for pid in "$postmaster" $(pgrep -P "$postmaster"); do taskset -a -c -p "$pg_cpus" "$pid" >/dev/null; done
    log "split cores: PostgreSQL on CPU $pg_cpus; ingestd, the load generator and the raw COPY client on CPU $app_cpus"
fi
pg_version=$(pg_psql "$url" -tAc "SHOW server_version")
pg_settings=$(pg_psql "$url" -tAc "SELECT string_agg(name || '=' || setting || coalesce(unit, ''), ', ' ORDER BY name) FROM pg_settings WHERE name IN ('fsync','synchronous_commit','full_page_writes','shared_buffers','max_wal_size','min_wal_size','checkpoint_timeout','autovacuum')")
log "PostgreSQL $pg_version at $url (postmaster pid $postmaster): $pg_settings"
pglog=$pgtmp/data/log/postgres.log
# log_mark: lines logged so far; log_count FROM PATTERN: matching lines since then.
log_mark() { wc -l <"$pglog"; }
log_count() { tail -n +"$(($1 + 1))" "$pglog" | grep -c -- "$2" || true; }

step "warm-up: COPY $(fmt "$warmup_rows") rows into a throw-away table; pre-create 4 GB of WAL segments; CHECKPOINT"
"$LOAD" copy-baseline --database-url "$url" --table bench_warmup --rows "$warmup_rows" \
    --connections "$writers" --ids "$ids" --drop-after --out "$out/warmup" >"$out/warmup.txt"
sed 's/^/  /' "$out/warmup.txt" >&2
# A fresh cluster creates (and zero-fills) every WAL segment it writes; later
# ones recycle them. Switch segments 256 times (4 GB) so the measured phases
# only recycle; min_wal_size keeps them across checkpoints.
pg_psql "$url" -c "CREATE TABLE bench_wal_fill (x int)" \
    -c "DO \$\$ BEGIN FOR i IN 1..256 LOOP INSERT INTO bench_wal_fill VALUES (i); PERFORM pg_switch_wal(); END LOOP; END \$\$" \
    -c "DROP TABLE bench_wal_fill" -c CHECKPOINT -c CHECKPOINT
log "pg_wal: $(du -sh "$pgtmp/data/pg_wal" | cut -f1)"
if [[ -z $baseline_rows ]]; then baseline_rows=$(((warmup + duration) * 320000)); fi

# busy_cores: CPU cores the whole machine kept busy over the last second.
busy_cores() {
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    sleep 1
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat)
    awk -v a="$a" -v b="$b" -v n="$(nproc)" 'BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; all = busy + y[2] - x[2]; printf "%.2f", (all > 0 ? n * busy / all : 0) }'
}
# wait_quiet: before a measured phase, wait (at most $quiet_wait s) until
# other processes leave the machine nearly idle; a build or a test suite
# running beside the benchmark would otherwise be measured as well.
wait_quiet() {
    local waited=0 busy
    while :; do
        busy=$(busy_cores)
        if awk -v b="$busy" 'BEGIN { exit !(b < 0.25) }'; then return 0; fi
        if ((waited == 0)); then log "the machine is busy ($busy cores used by other processes); waiting up to ${quiet_wait}s for it to quieten"; fi
        waited=$((waited + 1))
        if ((waited >= quiet_wait)); then
            log "WARNING: still $busy cores busy with other processes; measuring anyway (see the \"other processes\" column)"
            return 0
        fi
    done
}
# json_num FILE KEY: a top-level-ish number from ingestd's one-line /stats JSON.
stats_num() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" "$1" | head -n 1; }

load_common=(--batch-size "$batch" --duplicates "$dups" --dup-mode "$dup_mode" --ids "$ids" --devices "$devices"
             --watch-tree "postgres=$postmaster")
declare -a B_other I_other B_rps B_pg B_pgus B_ck B_av I_eps I_ueps I_p50 I_p99 I_p999 I_max I_cpu I_pg I_load I_hwm I_pss \
    I_ck I_av I_rc I_rows I_expect I_503 I_err I_batch I_staging I_ratio I_dupacked
idle_rss_first=""

for ((r = 1; r <= repeat; r++)); do
    step "[$r/$repeat] raw COPY: $writers connections (= writer.writers), 5000 rows per COPY, ${warmup}s + ${duration}s"
    pg_psql "$url" -c CHECKPOINT
    wait_quiet
    m=$(log_mark)
    "${app[@]}" "$LOAD" copy-baseline --database-url "$url" --table bench_copy_baseline --rows "$baseline_rows" \
        --connections "$writers" --batch-rows 5000 --streams "$concurrency" --body-events "$batch" --ids "$ids" --devices "$devices" \
        --warmup "$warmup" --duration "$duration" --watch-tree "postgres=$postmaster" \
        --out "$out/copy-baseline-$r" | tee "$out/copy-baseline-$r.txt"
    B=$out/copy-baseline-$r/result.json
    B_rps[r]=$(get "$B" totals.rows_per_s)
    B_pg[r]=$(get "$B" processes.postgres.cores_avg)
    B_pgus[r]=$(get "$B" processes.postgres.cpu_us_per_row)
    # CPU of everything else on the machine (other users' builds and tests disturb a benchmark).
    B_other[r]=$(awk -v m="$(get "$B" processes.machine.cores_avg)" -v p="${B_pg[r]}" -v l="$(get "$B" processes.ingestd-load.cores_avg)" 'BEGIN { v = m - p - l; printf "%.2f", (v > 0 ? v : 0) }')
    B_ck[r]=$(log_count "$m" 'checkpoint starting')
    B_av[r]=$(log_count "$m" 'automatic vacuum of table')
    pg_psql "$url" -c "DROP TABLE bench_copy_baseline"

    step "[$r/$repeat] ingestd ($config${sets[*]:+ ${sets[*]}}): $concurrency connections × POST /events/batch of $batch events, ${warmup}s + ${duration}s, ${dups}% duplicates ($dup_mode)"
    pg_psql "$url" -c CHECKPOINT
    wait_quiet
    start_ingestd bench_events "ingestd-$r"
    [[ -n $idle_rss_first ]] || idle_rss_first=$idle_rss_kib
    m=$(log_mark)
    "${app[@]}" "$LOAD" http --url "$addr" "${load_common[@]}" --watch "ingestd=$ingestd_pid" \
        --concurrency "$concurrency" --duration "$duration" --warmup "$warmup" \
        --out "$out/load-$r" | tee "$out/load-$r.txt"
    I_ck[r]=$(log_count "$m" 'checkpoint starting')
    I_av[r]=$(log_count "$m" 'automatic vacuum of table')
    http_get /stats >"$out/ingestd-$r-stats.json" 2>/dev/null || true
    stop_ingestd
    I_rc[r]=$stopped_rc
    I_rows[r]=$(pg_psql "$url" -tAc "SELECT count(*) FROM bench_events")
    # (and the latest-state table, when the run turned [state] on)
    pg_psql "$url" -c "DROP TABLE bench_events" -c "DROP TABLE IF EXISTS bench_events_state"
    L=$out/load-$r/result.json
    I_eps[r]=$(get "$L" rates.events_per_s_acked)
    I_ueps[r]=$(get "$L" rates.unique_events_per_s_acked)
    # Everything acknowledged, warm-up included, is what count(*) must show.
    I_expect[r]=$(get "$L" totals_with_warmup.unique_events_acked)
    I_dupacked[r]=$(get "$L" totals_with_warmup.duplicates_acked)
    I_503[r]=$(get "$L" totals.status.503 2>/dev/null || echo 0)
    I_err[r]=$(get "$L" totals.errors)
    I_p50[r]=$(get "$L" latency_ms.p50); I_p99[r]=$(get "$L" latency_ms.p99)
    I_p999[r]=$(get "$L" latency_ms.p999); I_max[r]=$(get "$L" latency_ms.max)
    I_cpu[r]=$(get "$L" processes.ingestd.cores_avg); I_pg[r]=$(get "$L" processes.postgres.cores_avg)
    I_load[r]=$(get "$L" processes.ingestd-load.cores_avg)
    I_other[r]=$(awk -v m="$(get "$L" processes.machine.cores_avg)" -v a="${I_cpu[r]}" -v p="${I_pg[r]}" -v l="${I_load[r]}" 'BEGIN { v = m - a - p - l; printf "%.2f", (v > 0 ? v : 0) }')
    I_hwm[r]=$(get "$L" processes.ingestd.vm_hwm_mib); I_pss[r]=$(get "$L" processes.postgres.rss_peak_mib)
    I_batch[r]=$(stats_num "$out/ingestd-$r-stats.json" mean)
    I_staging[r]=$(stats_num "$out/ingestd-$r-stats.json" staging_fallbacks)
    I_ratio[r]=$(div "${I_ueps[r]}" "${B_rps[r]}")
    log "[$r/$repeat] raw COPY $(fmt "${B_rps[r]}") rows/s, ingestd $(fmt "${I_ueps[r]}") new rows/s: ${I_ratio[r]} ×"
done

b_med=$(median "${B_rps[@]}")
eps_med=$(median "${I_eps[@]}")
ueps_med=$(median "${I_ueps[@]}")
ratio=$(div "$ueps_med" "$b_med")
pair_ratio=$(fix 2 "$(median "${I_ratio[@]}")")
counts_ok=1 rc_ok=1
for ((r = 1; r <= repeat; r++)); do
    [[ ${I_rows[r]} == "${I_expect[r]}" ]] || counts_ok=""
    [[ ${I_rc[r]} == 0 ]] || rc_ok=""
done

sweep_rc="" sweep_check="" floor_text=""
if [[ -n $sweep ]]; then
    pg_psql "$url" -c CHECKPOINT
    wait_quiet
    step "open-loop sweep at $sweep_points % of $(fmt "$eps_med") events/s (new ingestd, fresh table bench_sweep)"
    start_ingestd bench_sweep ingestd-sweep
    "${app[@]}" "$LOAD" http --url "$addr" "${load_common[@]}" --watch "ingestd=$ingestd_pid" \
        --sweep "$sweep_points" --max-event-rate "$eps_med" --connections $((concurrency * 2)) \
        --duration "$sweep_duration" --warmup 2 --out "$out/sweep" | tee "$out/sweep.txt"
    http_get /stats >"$out/ingestd-sweep-stats.json" 2>/dev/null || true
    stop_ingestd
    sweep_rc=$stopped_rc
    sweep_rows=$(pg_psql "$url" -tAc "SELECT count(*) FROM bench_sweep")
    expected=0
    n=$(awk -F, '{ print NF }' <<<"$sweep_points")
    for ((i = 0; i < n; i++)); do
        expected=$((expected + $(get "$out/sweep/result.json" "steps.$i.run.totals_with_warmup.unique_events_acked")))
    done
    if [[ $sweep_rows == "$expected" ]]; then
        sweep_check="count(*) $(fmt "$sweep_rows") = acknowledged"
    else
        sweep_check="count(*) $(fmt "$sweep_rows") ≠ $(fmt "$expected") acknowledged"
        counts_ok=""
    fi
    [[ $sweep_rc == 0 ]] || rc_ok=""

    # The latency floor at half load: raw COPY, open loop at the same rate,
    # taking every body that has arrived into one transaction the way
    # ingestd's writers do, but with no HTTP, parsing or ingestd CPU.
    half=$(awk -v e="$eps_med" 'BEGIN { printf "%d", e / 2 }')
    pg_psql "$url" -c CHECKPOINT
    wait_quiet
    step "latency floor: raw COPY open loop at $(fmt "$half") events/s (50 %), $writers connections"
    "${app[@]}" "$LOAD" copy-baseline --database-url "$url" --table bench_copy_floor --rows $(((sweep_duration + 3) * half)) \
        --connections "$writers" --batch-rows 10000 --streams $((concurrency * 2)) --body-events "$batch" --ids "$ids" \
        --event-rate "$half" --warmup 2 --duration "$sweep_duration" --watch-tree "postgres=$postmaster" \
        --out "$out/copy-floor" | tee "$out/copy-floor.txt"
    F=$out/copy-floor/result.json
    floor_text="raw COPY open loop at $(fmt "$half") events/s, $writers connections, latency from arrival to COMMIT: p50 $(get "$F" ack_latency_ms.p50) / p99 $(get "$F" ack_latency_ms.p99) / p99.9 $(get "$F" ack_latency_ms.p999) / max $(get "$F" ack_latency_ms.max) ms"
fi

L=$out/load-1/result.json
cpu_model=$(get "$L" machine.cpu_model)
kernel=$(get "$L" machine.kernel)
mem=$(get "$L" machine.mem_total_gib)
git_rev=$(git rev-parse --short HEAD 2>/dev/null || echo "(not a git checkout)")
git_dirty=""
if git rev-parse --git-dir >/dev/null 2>&1 && [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    git_dirty=" + uncommitted changes"
fi
cmd="scripts/bench.sh --profile $profile --repeat $repeat --duration $duration --warmup $warmup --concurrency $concurrency --batch-size $batch --duplicates $dups --dup-mode $dup_mode --ids $ids${sweep:+ --sweep}${single_shard:+ --single-shard}${split_cores:+ --split-cores}${sets[*]:+ ${sets[*]}}"
rel=${out#"$ROOT"/}
if [[ -n $counts_ok ]]; then count_text="every run: count(*) = events acknowledged (new ids)"; else count_text="MISMATCH, see the table"; fi

{
    echo "### ingestd vs raw COPY — $stamp"
    echo
    echo "Machine: $nproc × $cpu_model, ${mem} GiB, Linux $kernel; PostgreSQL $pg_version ($pg_settings)."
    echo "ingestd $git_rev$git_dirty, profile \`$config\` (writers=$writers, shards=$shards_eff, ack=$ack)."
    echo "Command: \`$cmd\`"
    echo
    echo "| median of $repeat | value |"
    echo "|---|---:|"
    echo "| raw binary COPY, $writers connections, 5000 rows/COPY | $(fmt "$b_med") rows/s |"
    echo "| ingestd, $concurrency connections × $batch events, ${dups}% duplicates ($dup_mode), ids $ids | $(fmt "$eps_med") events/s acked, $(fmt "$ueps_med") new rows/s |"
    echo "| **ratio to raw COPY** (median/median; median of pair ratios) | **$ratio ×** ($pair_ratio ×) |"
    echo "| ack latency p50 / p99 / p99.9 | $(median "${I_p50[@]}") / $(median "${I_p99[@]}") / $(median "${I_p999[@]}") ms |"
    echo "| CPU during load: ingestd / PostgreSQL / load generator | $(median "${I_cpu[@]}") / $(median "${I_pg[@]}") / $(median "${I_load[@]}") cores |"
    echo "| PostgreSQL CPU per row: raw COPY / under ingestd | $(median "${B_pgus[@]}") / $(div "$(median "${I_pg[@]}")e6" "$ueps_med" 2) µs |"
    echo "| ingestd RSS idle / peak VmHWM (max of $repeat) | $((idle_rss_first / 1024)) / $(fix 0 "$(maxof "${I_hwm[@]}")") MiB |"
    echo "| PostgreSQL PSS, all processes, peak (max of $repeat) | $(fix 0 "$(maxof "${I_pss[@]}")") MiB |"
    echo "| rows committed | $count_text |"
    echo "| ingestd exit code after SIGTERM | $([[ -n $rc_ok ]] && echo "0 every time" || echo "NOT 0, see the table") |"
    echo
    echo "| run | raw COPY rows/s | ingestd new rows/s | ratio | p50 / p99 / p99.9 / max ms | CPU ingestd / PG / load | PG CPU in raw COPY | other processes' CPU (COPY; ingestd) | batch mean | staging fallbacks | 503 / errors | count(*) = acked | checkpoints, autovacuums (COPY; ingestd) | exit |"
    echo "|---:|---:|---:|---:|---|---|---:|---|---:|---:|---|---|---|---:|"
    for ((r = 1; r <= repeat; r++)); do
        echo "| $r | $(fmt "${B_rps[r]}") | $(fmt "${I_ueps[r]}") | ${I_ratio[r]} | ${I_p50[r]} / ${I_p99[r]} / ${I_p999[r]} / ${I_max[r]} | ${I_cpu[r]} / ${I_pg[r]} / ${I_load[r]} | ${B_pg[r]} | ${B_other[r]}; ${I_other[r]} | $(fix 0 "${I_batch[r]:-0}") | ${I_staging[r]:-?} | ${I_503[r]} / ${I_err[r]} | $(fmt "${I_rows[r]}") $([[ ${I_rows[r]} == "${I_expect[r]}" ]] && echo "=" || echo "≠ $(fmt "${I_expect[r]}")") | ${B_ck[r]}, ${B_av[r]}; ${I_ck[r]}, ${I_av[r]} | ${I_rc[r]} |"
    done
    echo
    echo "Each phase: ${warmup}s warm-up, then ${duration}s measured, on a fresh table right after a CHECKPOINT; raw COPY and ingestd alternate."
    echo "\"Other processes' CPU\" is the whole machine's busy time minus ingestd, PostgreSQL and the load generator: anything else running disturbs the figures."
    if [[ -n $split_cores ]]; then
        echo "Split cores: PostgreSQL ran on CPU $pg_cpus; ingestd, the load generator and the raw COPY client on CPU $app_cpus."
    else
        echo "The load generator, ingestd and PostgreSQL share the machine's $nproc cores."
    fi
    if [[ -n $sweep ]]; then
        echo
        echo "Open-loop sweep (fractions of $(fmt "$eps_med") events/s, ${sweep_duration}s per step after 2s warm-up, $((concurrency * 2)) connections, latency from the intended send time; $sweep_check; ingestd exit code $sweep_rc):"
        echo
        grep '^|' "$out/sweep.txt" || true
        echo
        echo "Latency floor at 50 %: $floor_text."
    fi
    echo
    echo "Plots: \`$rel/load-1/latency.svg\`, \`$rel/load-1/throughput.svg\`${sweep:+, \`$rel/sweep/sweep.svg\`}."
} >"$out/summary.md"

step "summary"
cat <<EOF
raw COPY            $(fmt "$b_med") rows/s, median of $repeat ($writers connections, 5000 rows/COPY): $(for r in "${B_rps[@]}"; do printf '%s ' "$(fmt "$r")"; done)
ingestd             $(fmt "$ueps_med") new rows/s, median of $repeat ($concurrency connections, batch $batch, ${dups}% duplicates): $(for r in "${I_ueps[@]}"; do printf '%s ' "$(fmt "$r")"; done)
                    ($(fmt "$eps_med") events/s acknowledged; deliberate duplicates acknowledged per run: ${I_dupacked[*]})
ratio               $ratio × raw COPY (median of the pair ratios: $pair_ratio ×; pairs: ${I_ratio[*]})
ack latency         p50 $(median "${I_p50[@]}") ms  p99 $(median "${I_p99[@]}") ms  p99.9 $(median "${I_p999[@]}") ms (medians)
CPU (cores)         ingestd $(median "${I_cpu[@]}")  PostgreSQL $(median "${I_pg[@]}")  load generator $(median "${I_load[@]}")  other processes $(median "${I_other[@]}")   (machine: $nproc cores, shared by all)
ingestd memory      idle RSS $((idle_rss_first / 1024)) MiB, peak VmHWM $(maxof "${I_hwm[@]}") MiB
committed           $count_text
exit codes          ${I_rc[*]}${sweep:+ (sweep instance: $sweep_rc; $sweep_check)}${sweep:+
latency floor       $floor_text}
results             $out

--- markdown for BENCHMARKS.md ($out/summary.md) ---
EOF
cat "$out/summary.md"
if [[ -z $rc_ok || -z $counts_ok ]]; then
    log "WARNING: an ingestd exit code was not 0, or count(*) did not match the acknowledged events"
    exit 1
fi

#!/usr/bin/env bash
# Fuzz ingestd with cargo-fuzz (libFuzzer): build the targets of fuzz/, run
# each for a fixed time, and print one summary line per target.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]      (default: all 600)
#
# Targets (fuzz/fuzz_targets/, invariants in src/fuzzing.rs and
# docs/FUZZING.md): http_request event_validator ndjson_splitter ws_ingest
# spool_reader.
#
# What it does:
#   1. cargo +nightly fuzz build --debug-assertions (AddressSanitizer, overflow
#      checks and debug assertions on; needs the nightly toolchain and
#      `cargo install cargo-fuzz`)
#   2. per target: copies fuzz/seeds/TARGET/* into the running corpus
#      fuzz/corpus/TARGET/ (gitignored, kept between runs), then runs the
#      fuzzer, niced, one process, for SECONDS in all with -max_len per
#      target, -rss_limit_mb=2048, -timeout=10 and -print_final_stats=1.
#      libFuzzer stops at the first crash: the input is kept in
#      fuzz/artifacts/TARGET/ and the fuzzer restarts for the time left (at
#      most FUZZ_MAX_RESTARTS times).
#   3. prints, per target:
#      target=NAME execs=N secs=S crashes=K corpus=FILES
#      (execs: libFuzzer's stat::number_of_executed_units, summed over
#      restarts; crashes: crash, timeout, OOM and leak inputs saved)
#
# Logs: fuzz/artifacts/TARGET/run-N.log. A finding replays with
#   fuzz/target/x86_64-unknown-linux-gnu/release/TARGET fuzz/artifacts/TARGET/crash-…
# and, once saved under fuzz/regressions/TARGET/, with
#   cargo test --release --lib fuzzing
#
# Environment: FUZZ_NICE (default 10), FUZZ_MAX_RESTARTS (default 20),
# FUZZ_EXTRA_ARGS (more libFuzzer flags).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT/fuzz"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

ALL=(http_request event_validator ndjson_splitter ws_ingest spool_reader)
target_arg=${1:-all}
seconds=${2:-600}
nice_level=${FUZZ_NICE:-10}
max_restarts=${FUZZ_MAX_RESTARTS:-20}
read -r -a extra <<<"${FUZZ_EXTRA_ARGS:-}"

if [[ $target_arg == all ]]; then
    targets=("${ALL[@]}")
elif [[ " ${ALL[*]} " == *" $target_arg "* ]]; then
    targets=("$target_arg")
else
    echo "unknown target '$target_arg'; one of: all ${ALL[*]}" >&2
    exit 64
fi
[[ $seconds =~ ^[0-9]+$ && $seconds -gt 0 ]] || { echo "SECONDS must be a positive integer" >&2; exit 64; }

# Longest input per target: past each limit the code under test enforces.
max_len() {
    case $1 in
        http_request) echo 20480 ;;    # server.max_header_bytes (16 KiB) and a body
        spool_reader) echo 8192 ;;     # several 1 KiB segments' worth of records
        *) echo 16384 ;;               # bodies and frames past websocket.max_message_bytes (4 KiB here)
    esac
}

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo +nightly fuzz build --debug-assertions"
nice -n "$nice_level" cargo +nightly fuzz build --debug-assertions >&2
triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
bin_dir=target/$triple/release

summary=()
for t in "${targets[@]}"; do
    corpus=corpus/$t artifacts=artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true
    findings_before=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    step "$t: ${seconds}s, -max_len=$(max_len "$t")"
    execs=0 runs=0
    start=$(date +%s)
    while :; do
        left=$((seconds - ($(date +%s) - start)))
        ((left > 0 && runs <= max_restarts)) || break
        log=$artifacts/run-$runs.log
        rc=0
        nice -n "$nice_level" "$bin_dir/$t" "$corpus" \
            -max_total_time="$left" -max_len="$(max_len "$t")" -rss_limit_mb=2048 -timeout=10 \
            -print_final_stats=1 -artifact_prefix="$artifacts/" "${extra[@]}" >"$log" 2>&1 || rc=$?
        n=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        # Without final stats (killed hard), the last status line's count.
        [[ -n $n ]] || n=$(grep -aoE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#')
        execs=$((execs + ${n:-0}))
        runs=$((runs + 1))
        if ((rc == 0)); then break; fi
        grep -aE '^(==[0-9]+== ERROR|SUMMARY|thread .* panicked)' "$log" | head -n 3 >&2 || true
        grep -aE 'Test unit written to' "$log" >&2 || true
    done
    secs=$(($(date +%s) - start))
    findings_after=$(find "$artifacts" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    files=$(find "$corpus" -maxdepth 1 -type f | wc -l)
    line="target=$t execs=$execs secs=$secs crashes=$((findings_after - findings_before)) corpus=$files"
    echo "$line" >&2
    summary+=("$line")
done

step "summary"
printf '%s\n' "${summary[@]}"

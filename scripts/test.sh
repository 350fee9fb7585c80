#!/usr/bin/env bash
# Run every test: unit, integration (against one ephemeral PostgreSQL cluster)
# and doc tests, plus a --check-config of every tuning profile.
#
#   scripts/test.sh                      everything
#   scripts/test.sh NAME...              only tests whose name contains NAME
#                                        (arguments go to the test harness)
#   scripts/test.sh --test it -- NAME    arguments before "--" go to cargo test,
#                                        arguments after it to the test harness
#
# PostgreSQL, PgBouncer (for tests/it/pgbouncer.rs), promtool (package
# prometheus, for the /metrics lint test), Chromium (the browser tests in
# tests/it/cors.rs run it headless; scripts/lib/chromium.sh) and Redis and
# NATS (tests/it/cluster.rs starts redis-server and nats-server itself;
# scripts/lib/bus.sh; their paths are exported as INGESTD_TEST_REDIS_SERVER
# and INGESTD_TEST_NATS_SERVER) are installed from Debian packages if
# missing. The cluster lives in
# a temporary directory on a free port and is removed on exit; tests find it in
# INGESTD_TEST_DATABASE_URL (if the caller already sets that variable, its
# database is used and no cluster is started). Other INGESTD_* variables are
# cleared. Test threads: RUST_TEST_THREADS (default 2).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
[[ -d $HOME/.cargo/bin ]] && PATH=$HOME/.cargo/bin:$PATH

cargo_args=() harness_args=()
if [[ " $* " == *" -- "* ]]; then
    while (($#)); do
        if [[ $1 == -- ]]; then shift; harness_args=("$@"); break; fi
        cargo_args+=("$1"); shift
    done
else
    harness_args=("$@")
fi

step() { printf '\n==> %s\n' "$*" >&2; }

# Settings from the caller's shell must not leak into the tests' ingestd runs
# (INGESTD_TEST_* and the INGESTD_PG_* knobs of scripts/lib/pg.sh are kept).
while IFS= read -r v; do
    case $v in INGESTD_TEST_* | INGESTD_PG_*) ;; *) unset "$v" ;; esac
done < <(compgen -e | grep '^INGESTD_' || true)

# shellcheck source-path=SCRIPTDIR source=lib/pg.sh
. "$ROOT/scripts/lib/pg.sh"

# shellcheck source-path=SCRIPTDIR source=lib/promtool.sh
. "$ROOT/scripts/lib/promtool.sh"

step "promtool"
promtool_ensure_installed

step "PostgreSQL"
pgtmp=$(mktemp -d "${TMPDIR:-/tmp}/ingestd-test-pg.XXXXXX")
cleanup() {
    local rc=$?
    [[ -n ${own_cluster:-} ]] && { pg_stop "$pgtmp/data" || true; }
    rm -rf -- "$pgtmp"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
if [[ -n ${INGESTD_TEST_DATABASE_URL:-} ]]; then
    url=$INGESTD_TEST_DATABASE_URL
    echo "using the caller's INGESTD_TEST_DATABASE_URL; no cluster started" >&2
else
    pg_ensure_installed
    chmod 755 "$pgtmp"
    own_cluster=1
    url=$(pg_start "$pgtmp/data" "$(pg_free_port)")
fi
export INGESTD_TEST_DATABASE_URL=$url
echo "INGESTD_TEST_DATABASE_URL=$url" >&2

# shellcheck source-path=SCRIPTDIR source=lib/chromium.sh
. "$ROOT/scripts/lib/chromium.sh"
step "Chromium (headless, for tests/it/cors.rs)"
chromium_ensure_installed

step "PgBouncer"
pgbouncer_ensure_installed
/usr/sbin/pgbouncer --version | head -n 1 >&2

# shellcheck source-path=SCRIPTDIR source=lib/bus.sh
. "$ROOT/scripts/lib/bus.sh"
step "Redis and NATS (for tests/it/cluster.rs)"
redis_ensure_installed
nats_ensure_installed
INGESTD_TEST_REDIS_SERVER=$(bus_redis_bin)
INGESTD_TEST_NATS_SERVER=$(bus_nats_bin)
export INGESTD_TEST_REDIS_SERVER INGESTD_TEST_NATS_SERVER
"$INGESTD_TEST_REDIS_SERVER" --version >&2
"$INGESTD_TEST_NATS_SERVER" --version >&2

step "cargo build --release --bins"
cargo build --release --bins

failed=()
checks_ok=0 checks_failed=0
log=$pgtmp/cargo-test.out
: >"$log"

shopt -s nullglob
profiles=(tuning/*.toml)
if ((${#profiles[@]})); then
    step "ingestd --check-config on every tuning profile"
    for f in "${profiles[@]}"; do
        if out=$(target/release/ingestd --check-config --config "$f" --database-url "$url" 2>&1 >/dev/null); then
            echo "ok   $f" >&2
            checks_ok=$((checks_ok + 1))
        else
            echo "FAIL $f" >&2
            printf '%s\n' "$out" | sed 's/^/     /' >&2
            failed+=("ingestd --check-config --config $f")
            checks_failed=$((checks_failed + 1))
        fi
    done
fi

export RUST_TEST_THREADS=${RUST_TEST_THREADS:-2}

# Run cargo test, keeping its stdout (the "test result:" lines) for the summary.
run_cargo_test() {
    local rc
    set +e
    cargo test --release "$@" | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}

test_rc=0
# Doc tests are not part of --all-targets; run them when there is a library
# and no cargo-level selection was asked for.
if [[ -f src/lib.rs && ${#cargo_args[@]} -eq 0 ]]; then
    step "cargo test --release --doc"
    run_cargo_test --doc -- "${harness_args[@]}" || { test_rc=$?; failed+=("cargo test --doc (exit $test_rc)"); }
fi

# A cargo-level target selection (e.g. --test it) replaces --all-targets.
targets=(--all-targets)
((${#cargo_args[@]} == 0)) || targets=()
step "cargo test --release ${targets[*]} --no-fail-fast ${cargo_args[*]} -- ${harness_args[*]} (RUST_TEST_THREADS=$RUST_TEST_THREADS)"
rc=0
run_cargo_test "${targets[@]}" --no-fail-fast "${cargo_args[@]}" -- "${harness_args[@]}" || rc=$?
if ((rc != 0)); then
    test_rc=$rc
    failed+=("cargo test ${targets[*]} ${cargo_args[*]} (exit $rc)")
fi

# One closing line over everything: cargo's per-binary "test result:" lines
# plus the profile checks.
read -r passed nfailed ignored < <(awk '
    /^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i + 1) ~ /^passed/) p += $i
            if ($(i + 1) ~ /^failed/) f += $i
            if ($(i + 1) ~ /^ignored/) g += $i
        }
    }
    END { print p + 0, f + 0, g + 0 }' "$log" 2>/dev/null || echo "0 0 0")
passed=$((passed + checks_ok))
nfailed=$((nfailed + checks_failed))

if ((${#failed[@]})); then
    printf '\ntest.sh: FAILED:\n' >&2
    printf '  %s\n' "${failed[@]}" >&2
    printf 'summary: %d passed, %d failed, %d skipped\n' "$passed" "$nfailed" "$ignored"
    ((test_rc != 0)) && exit "$test_rc"
    exit 1
fi
printf 'summary: %d passed, %d failed, %d skipped\n' "$passed" "$nfailed" "$ignored"

# shellcheck shell=bash
# Headless Chromium for the browser tests (tests/it/cors.rs): installed from
# Debian packages when /usr/bin/chromium is missing, the way scripts/lib/pg.sh
# installs PostgreSQL. The tests find the binary in INGESTD_TEST_CHROMIUM
# (default /usr/bin/chromium) and fail, naming this script, when it is absent.

chromium_msg() { printf 'chromium.sh: %s\n' "$*" >&2; }

# Idempotent: does nothing (and prints nothing) when chromium is present.
chromium_ensure_installed() {
    local bin=${INGESTD_TEST_CHROMIUM:-/usr/bin/chromium}
    [[ -x $bin ]] && return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            chromium_msg "chromium is not installed and we are not root (no sudo either)."
            chromium_msg "Install it (Debian: apt-get install chromium) or set INGESTD_TEST_CHROMIUM."
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        chromium_msg "chromium is not installed and apt-get is not available; install it yourself."
        return 1
    fi
    chromium_msg "chromium not found; installing it from Debian packages (apt-get) ..."
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/ingestd-apt.XXXXXX")
    # The package lists may be fresh already (pg.sh updates them when it installs).
    if ! "${apt[@]}" install --no-install-recommends chromium >"$log" 2>&1; then
        if ! { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends chromium; } >>"$log" 2>&1; then
            tail -n 40 "$log" >&2; rm -f "$log"
            chromium_msg "apt-get install of chromium failed"
            return 1
        fi
    fi
    rm -f "$log"
    if [[ ! -x $bin ]]; then
        chromium_msg "chromium installed but $bin is missing"
        return 1
    fi
    chromium_msg "chromium installed: $("$bin" --version 2>/dev/null || echo "$bin")"
}

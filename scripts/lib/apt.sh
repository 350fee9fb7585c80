# shellcheck shell=bash
# apt_ensure TAG WHAT PACKAGE BIN: install a Debian package with apt-get so
# that BIN exists, for the programs the tests drive (PgBouncer, Chromium,
# Redis, NATS). Idempotent: does nothing (and prints nothing) when BIN is
# present. Not root: uses sudo if there is one, else says what to install.
# The package list may be older than the archive: install, else update and
# retry. Messages go to stderr prefixed with TAG.
# Source this file; it defines functions only and changes no shell options.

apt_ensure() {
    local tag=$1 what=$2 pkg=$3 bin=$4
    [[ -x $bin ]] && return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            printf '%s: %s is not installed and we are not root (no sudo either): apt-get install %s\n' \
                "$tag" "$what" "$pkg" >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        printf '%s: %s is not installed and apt-get is not available; install %s yourself\n' \
            "$tag" "$what" "$pkg" >&2
        return 1
    fi
    printf '%s: %s not found; installing it from Debian packages (apt-get) ...\n' "$tag" "$what" >&2
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/ingestd-apt.XXXXXX")
    if ! "${apt[@]}" install --no-install-recommends "$pkg" >"$log" 2>&1; then
        if ! { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends "$pkg"; } >>"$log" 2>&1; then
            tail -n 40 "$log" >&2; rm -f "$log"
            printf '%s: apt-get install %s failed\n' "$tag" "$pkg" >&2
            return 1
        fi
    fi
    rm -f "$log"
    if [[ ! -x $bin ]]; then
        printf '%s: %s installed but %s is missing\n' "$tag" "$pkg" "$bin" >&2
        return 1
    fi
    printf '%s: %s installed: %s\n' "$tag" "$what" "$("$bin" --version 2>/dev/null | head -n 1 || echo "$bin")" >&2
}

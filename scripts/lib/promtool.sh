# shellcheck shell=bash
# promtool_ensure_installed: install promtool (Debian package `prometheus`)
# when missing, the way scripts/lib/pg.sh installs PostgreSQL. The tests run
# `promtool check metrics` on a real scrape (tests/it/observability.rs).
# Source this file; it defines functions only and changes no shell options.
# The package's daemon is not wanted: where no policy-rc.d stops services
# from starting on install (Docker images ship one), a temporary one does.

promtool_ensure_installed() {
    command -v promtool >/dev/null 2>&1 && return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            printf 'promtool: not installed and we are not root (no sudo either); apt-get install prometheus\n' >&2
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        printf 'promtool: not installed and apt-get is not available; install Prometheus'"'"'s promtool\n' >&2
        return 1
    fi
    printf 'promtool: not found; installing the Debian package prometheus (apt-get) ...\n' >&2
    local policy=/usr/sbin/policy-rc.d own_policy='' log rc=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null && "${sudo[@]}" chmod 755 "$policy"
        own_policy=1
    fi
    log=$(mktemp "${TMPDIR:-/tmp}/ingestd-apt.XXXXXX")
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    if ! { "${apt[@]}" update && "${apt[@]}" install --no-install-recommends prometheus; } >"$log" 2>&1; then
        tail -n 40 "$log" >&2
        printf 'promtool: apt-get install prometheus failed\n' >&2
        rc=1
    fi
    rm -f "$log"
    [[ -n $own_policy ]] && "${sudo[@]}" rm -f "$policy"
    ((rc == 0)) || return 1
    command -v promtool >/dev/null 2>&1 || { printf 'promtool: installed but not on PATH\n' >&2; return 1; }
    printf 'promtool: %s\n' "$(command -v promtool)" >&2
}

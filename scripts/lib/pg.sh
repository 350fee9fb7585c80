# shellcheck shell=bash
# Helpers to install, start and stop a private PostgreSQL cluster.
# Source this file; it defines functions only and changes no shell options.
#
#   pg_ensure_installed            install PostgreSQL from Debian packages if missing
#   pgbouncer_ensure_installed     install PgBouncer (/usr/sbin/pgbouncer) if missing
#   pg_free_port                   print a free TCP port on 127.0.0.1
#   pg_port_free PORT              succeed if nothing listens on 127.0.0.1:PORT
#   pg_start DIR PORT              init (if DIR is empty) and start a cluster in DIR,
#                                  print its URL; reuse it if it already runs
#   pg_stop DIR                    stop the cluster in DIR (fast mode), if running
#   pg_running DIR                 succeed if the cluster in DIR runs
#   pg_ensure_database URL NAME    create database NAME if missing, print its URL
#   pg_psql URL ARGS...            run psql against URL
#   pg_tls_only DIR CERT KEY [CLIENT_CA CERT_USER]
#                                  the running cluster in DIR: TCP only over TLS
#                                  (hostssl, scram-sha-256; CERT_USER only by a
#                                  client certificate CLIENT_CA signed), reloaded
#
# Messages go to stderr; only results (URLs, ports) go to stdout.
#
# Environment knobs:
#   INGESTD_PG_OS_USER   system user that owns and runs the cluster when the
#                        caller is root (default: ingestd-pg; initdb refuses root)
#   INGESTD_PG_BINDIR    directory holding initdb/pg_ctl/postgres (default: newest
#                        /usr/lib/postgresql/*/bin, else whatever is on PATH)
#   INGESTD_PG_SUPERUSER database superuser created by initdb (default: postgres)

PG_OS_USER=${INGESTD_PG_OS_USER:-ingestd-pg}
PG_SUPERUSER=${INGESTD_PG_SUPERUSER:-postgres}

# shellcheck source-path=SCRIPTDIR source=apt.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/apt.sh"

pg_msg() { printf 'pg: %s\n' "$*" >&2; }

# Print the directory holding the server binaries, or fail.
# With an argument DIR holding an existing cluster, prefer that cluster's
# major version.
pg_bindir() {
    local dir=${1:-} d ver b
    if [[ -n ${INGESTD_PG_BINDIR:-} ]]; then
        printf '%s\n' "$INGESTD_PG_BINDIR"
        return 0
    fi
    if [[ -n $dir && -f $dir/PG_VERSION ]]; then
        ver=$(<"$dir/PG_VERSION")
        if [[ -x /usr/lib/postgresql/$ver/bin/pg_ctl ]]; then
            printf '%s\n' "/usr/lib/postgresql/$ver/bin"
            return 0
        fi
    fi
    d=$(for b in /usr/lib/postgresql/*/bin; do
            if [[ -x $b/initdb && -x $b/pg_ctl && -x $b/postgres ]]; then printf '%s\n' "$b"; fi
        done | sort -V | tail -n 1)
    if [[ -n $d ]]; then
        printf '%s\n' "$d"
        return 0
    fi
    if d=$(command -v pg_ctl 2>/dev/null) && command -v initdb >/dev/null 2>&1 \
        && command -v postgres >/dev/null 2>&1; then
        d=$(readlink -f "$d")
        printf '%s\n' "${d%/*}"
        return 0
    fi
    return 1
}

# Print the path of a PostgreSQL program: the server bindir first, then PATH.
pg_bin() {
    local name=$1 dir=${2:-} bd
    if bd=$(pg_bindir "$dir") && [[ -x $bd/$name ]]; then
        printf '%s\n' "$bd/$name"
    elif command -v "$name" >/dev/null 2>&1; then
        command -v "$name"
    else
        pg_msg "cannot find '$name' (is PostgreSQL installed? pg_ensure_installed installs it)"
        return 1
    fi
}

# Install PostgreSQL from Debian packages when the server binaries are missing.
# Idempotent: does nothing (and prints nothing) when they are present.
pg_ensure_installed() {
    if pg_bindir >/dev/null 2>&1 && pg_bin psql >/dev/null 2>&1 \
        && pg_bin pg_isready >/dev/null 2>&1; then
        return 0
    fi
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            pg_msg "PostgreSQL is not installed and we are not root (no sudo either)."
            pg_msg "Install it (Debian: apt-get install postgresql-15) or set INGESTD_DATABASE_URL."
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        pg_msg "PostgreSQL is not installed and apt-get is not available;"
        pg_msg "install PostgreSQL (server + client) yourself or set INGESTD_DATABASE_URL."
        return 1
    fi
    pg_msg "PostgreSQL not found; installing it from Debian packages (apt-get) ..."
    local apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q -y
               -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    local log
    log=$(mktemp "${TMPDIR:-/tmp}/ingestd-apt.XXXXXX")
    if ! "${apt[@]}" update >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        pg_msg "apt-get update failed"
        return 1
    fi
    # Install postgresql-common first and tell it not to create (and start) the
    # distribution's default "main" cluster on port 5432: we run our own.
    if "${apt[@]}" install --no-install-recommends postgresql-common >>"$log" 2>&1 \
        && [[ -f /etc/postgresql-common/createcluster.conf ]]; then
        "${sudo[@]}" sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
            /etc/postgresql-common/createcluster.conf || true
    fi
    # Debian 12 ships PostgreSQL 15; other releases: take the distribution's default.
    if ! "${apt[@]}" install --no-install-recommends postgresql-15 >>"$log" 2>&1; then
        if ! "${apt[@]}" install --no-install-recommends postgresql postgresql-client >>"$log" 2>&1; then
            tail -n 40 "$log" >&2; rm -f "$log"
            pg_msg "apt-get install of PostgreSQL failed"
            return 1
        fi
    fi
    rm -f "$log"
    if ! pg_bindir >/dev/null 2>&1; then
        pg_msg "PostgreSQL installed but its binaries were not found under /usr/lib/postgresql/*/bin"
        return 1
    fi
    pg_msg "PostgreSQL installed: $(pg_bindir)"
}

# Install PgBouncer from Debian packages when /usr/sbin/pgbouncer is missing
# (tests/it/pgbouncer.rs runs it in front of the test cluster). Idempotent.
pgbouncer_ensure_installed() { apt_ensure pg PgBouncer pgbouncer /usr/sbin/pgbouncer; }

# Succeed if nothing accepts connections on 127.0.0.1:PORT.
pg_port_free() {
    local port=$1
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$port" <<'PY' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
    else
        ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null
    fi
}

# Print a TCP port that is free on 127.0.0.1 right now.
pg_free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 30000))
        if pg_port_free "$p"; then printf '%s\n' "$p"; return 0; fi
    done
    pg_msg "no free port found"
    return 1
}

# Run a command as the cluster's OS user (root cannot run initdb/postgres).
pg_as() {
    if [[ $(id -u) -eq 0 ]]; then
        (cd / && runuser -u "$PG_OS_USER" -- "$@")
    else
        (cd / && "$@")
    fi
}

# Create the cluster's OS user when running as root.
pg_ensure_os_user() {
    [[ $(id -u) -eq 0 ]] || return 0
    id -u "$PG_OS_USER" >/dev/null 2>&1 && return 0
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "ingestd private PostgreSQL" "$PG_OS_USER" \
        || { pg_msg "useradd $PG_OS_USER failed"; return 1; }
}

# Make every parent directory of $1 traversable by the cluster's OS user.
pg_ensure_traversable() {
    [[ $(id -u) -eq 0 ]] || return 0
    local p=$1
    while [[ $p != / && -n $p ]]; do
        p=$(dirname "$p")
        if ! runuser -u "$PG_OS_USER" -- test -x "$p" 2>/dev/null; then
            pg_msg "making $p traversable (chmod o+x) for $PG_OS_USER"
            chmod o+x "$p" || return 1
        fi
    done
}

# Succeed if the cluster in DIR runs.
pg_running() {
    local dir=$1 pg_ctl
    [[ -f $dir/PG_VERSION && -f $dir/postmaster.pid ]] || return 1
    pg_ctl=$(pg_bin pg_ctl "$dir") || return 1
    pg_as "$pg_ctl" status -D "$dir" >/dev/null 2>&1
}

# Port of the running cluster in DIR (line 4 of postmaster.pid).
pg_running_port() {
    sed -n 4p "$1/postmaster.pid" 2>/dev/null
}

pg_url() { printf 'postgres://%s@127.0.0.1:%s/%s\n' "$PG_SUPERUSER" "$1" "${2:-postgres}"; }

# pg_start DIR PORT: initdb DIR if it holds no cluster (it must then be empty
# or absent), start the cluster on 127.0.0.1:PORT and wait until it accepts
# connections. If it already runs, reuse it (on whatever port it has).
# Prints postgres://postgres@127.0.0.1:PORT/postgres on stdout.
pg_start() {
    local dir=$1 port=$2
    [[ -n $dir && -n $port ]] || { pg_msg "usage: pg_start DIR PORT"; return 1; }
    dir=$(realpath -m -- "$dir")

    pg_ensure_os_user || return 1

    if pg_running "$dir"; then
        local running
        running=$(pg_running_port "$dir")
        if [[ -n $running && $running != "$port" ]]; then
            pg_msg "cluster in $dir already runs on port $running (not $port); reusing it"
        fi
        pg_url "${running:-$port}"
        return 0
    fi

    local initdb pg_ctl out
    if [[ ! -f $dir/PG_VERSION ]]; then
        if [[ -d $dir && -n $(ls -A -- "$dir") ]]; then
            pg_msg "$dir is not empty and holds no PostgreSQL cluster; refusing to initdb there"
            return 1
        fi
        mkdir -p -- "$dir" || return 1
        if [[ $(id -u) -eq 0 ]]; then chown "$PG_OS_USER:" "$dir" || return 1; fi
        chmod 700 "$dir"
        pg_ensure_traversable "$dir" || return 1
        initdb=$(pg_bin initdb) || return 1
        pg_msg "initdb $dir"
        if ! out=$(pg_as "$initdb" -D "$dir" -U "$PG_SUPERUSER" -A trust -E UTF8 --locale=C 2>&1); then
            printf '%s\n' "$out" >&2
            pg_msg "initdb failed"
            return 1
        fi
        printf '\n# ingestd: settings managed by scripts/lib/pg.sh (rewritten at every start)\ninclude_if_exists = '"'"'ingestd.conf'"'"'\n' \
            | pg_as tee -a "$dir/postgresql.conf" >/dev/null || return 1
    else
        pg_ensure_traversable "$dir" || return 1
    fi

    # The Unix socket path must fit in sun_path (107 bytes); fall back to TCP only.
    local sockdir=$dir
    if (( ${#dir} + 20 > 100 )); then sockdir=""; fi
    pg_as tee "$dir/ingestd.conf" >/dev/null <<EOF || return 1
# Written by scripts/lib/pg.sh at every start; edit that file instead.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sockdir'
fsync = on
shared_buffers = 256MB
max_wal_size = 4GB
max_connections = 200
EOF
    pg_as mkdir -p "$dir/log" || return 1

    pg_ctl=$(pg_bin pg_ctl "$dir") || return 1
    pg_msg "starting PostgreSQL in $dir on 127.0.0.1:$port (log: $dir/log/postgres.log)"
    if ! pg_as "$pg_ctl" start -D "$dir" -l "$dir/log/postgres.log" -w -t 60 >/dev/null 2>&1; then
        pg_msg "pg_ctl start failed; last lines of $dir/log/postgres.log:"
        tail -n 20 "$dir/log/postgres.log" >&2 2>/dev/null || true
        return 1
    fi

    local isready
    isready=$(pg_bin pg_isready "$dir") || return 1
    for _ in $(seq 1 120); do
        if "$isready" -q -h 127.0.0.1 -p "$port" -U "$PG_SUPERUSER" -d postgres; then
            pg_url "$port"
            return 0
        fi
        sleep 0.25
    done
    pg_msg "PostgreSQL in $dir did not become ready on port $port; see $dir/log/postgres.log"
    return 1
}

# pg_stop DIR: stop the cluster in DIR (fast shutdown). No-op if not running.
pg_stop() {
    local dir=$1 pg_ctl
    dir=$(realpath -m -- "$dir")
    pg_running "$dir" || return 0
    pg_ctl=$(pg_bin pg_ctl "$dir") || return 1
    pg_msg "stopping PostgreSQL in $dir"
    pg_as "$pg_ctl" stop -D "$dir" -m fast -w -t 60 >/dev/null
}

# pg_psql URL ARGS...: psql with no .psqlrc, stopping at the first error.
pg_psql() {
    local url=$1 psql
    shift
    psql=$(pg_bin psql) || return 1
    "$psql" -X -q -v ON_ERROR_STOP=1 "$url" "$@"
}

# pg_ensure_database URL NAME: create database NAME (via the server in URL) if
# missing; print the URL of NAME.
pg_ensure_database() {
    local url=$1 name=$2 exists
    [[ $name =~ ^[a-z_][a-z0-9_]*$ ]] || { pg_msg "bad database name: $name"; return 1; }
    exists=$(pg_psql "$url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$name'") || return 1
    if [[ $exists != 1 ]]; then
        pg_msg "creating database $name"
        pg_psql "$url" -c "CREATE DATABASE $name" || return 1
    fi
    printf '%s/%s\n' "${url%/*}" "$name"
}

# pg_tls_only DIR CERT KEY [CLIENT_CA CERT_USER]: TLS on with CERT and KEY
# (PEM, copied into DIR and owned by the cluster's user, as PostgreSQL
# requires of its key); TCP only through hostssl with a password
# (scram-sha-256); the Unix socket stays trust for administration. With
# CLIENT_CA and CERT_USER, the server asks clients for a certificate signed
# by CLIENT_CA (ssl_ca_file), and CERT_USER logs in only with one whose CN
# is its name (pg_hba `cert`, before the password line: no fall-through).
# Reloads the running cluster.
pg_tls_only() {
    local dir=$1 cert=$2 key=$3 client_ca=${4:-} cert_user=${5:-} pg_ctl
    local conf=("# Written by pg_tls_only in scripts/lib/pg.sh." "ssl = on"
                "ssl_cert_file = 'server.crt'" "ssl_key_file = 'server.key'"
                "password_encryption = 'scram-sha-256'")
    local hba=("# Written by pg_tls_only in scripts/lib/pg.sh: TCP only over TLS."
               "local   all all                trust")
    dir=$(realpath -m -- "$dir")
    if [[ -n $client_ca || -n $cert_user ]]; then
        [[ -n $client_ca && $cert_user =~ ^[a-z_][a-z0-9_]*$ ]] \
            || { pg_msg "usage: pg_tls_only DIR CERT KEY [CLIENT_CA CERT_USER]"; return 1; }
        pg_as install -m 600 /dev/stdin "$dir/client-ca.crt" <"$client_ca" || return 1
        conf+=("ssl_ca_file = 'client-ca.crt'")
        hba+=("hostssl all $cert_user 127.0.0.1/32   cert")
    fi
    hba+=("hostssl all all 127.0.0.1/32   scram-sha-256")
    pg_as install -m 600 /dev/stdin "$dir/server.crt" <"$cert" || return 1
    pg_as install -m 600 /dev/stdin "$dir/server.key" <"$key" || return 1
    printf '%s\n' "${conf[@]}" | pg_as tee "$dir/ingestd-tls.conf" >/dev/null || return 1
    if ! grep -q "ingestd-tls.conf" "$dir/postgresql.conf"; then
        printf "include_if_exists = 'ingestd-tls.conf'\n" | pg_as tee -a "$dir/postgresql.conf" >/dev/null || return 1
    fi
    printf '%s\n' "${hba[@]}" | pg_as tee "$dir/pg_hba.conf" >/dev/null || return 1
    pg_ctl=$(pg_bin pg_ctl "$dir") || return 1
    pg_as "$pg_ctl" reload -D "$dir" >/dev/null
}

# shellcheck shell=bash
# The message buses of the cluster feed (issue 16, `[cluster] feed`): Redis
# and NATS, installed from Debian packages when missing (scripts/lib/apt.sh), and private servers of either on a
# free port for scripts/fanout.sh --cluster. The integration tests
# (tests/it/cluster.rs) start their own servers from Rust, so that a test can
# kill one and restart it on the same port; they find the binaries in
# INGESTD_TEST_REDIS_SERVER and INGESTD_TEST_NATS_SERVER (exported by
# scripts/test.sh; defaults /usr/bin/redis-server and /usr/sbin/nats-server).
# Source this file; it defines functions only and changes no shell options.
#
#   redis_ensure_installed     install redis-server (package redis-server) if missing
#   nats_ensure_installed      install nats-server (package nats-server) if missing
#   bus_free_port              print a free TCP port on 127.0.0.1
#   redis_start DIR PORT       start a private redis-server on 127.0.0.1:PORT
#                              (no persistence, files in DIR), wait until it
#                              answers PING, print redis://127.0.0.1:PORT
#   redis_stop DIR             stop the redis-server started in DIR, if running
#   nats_start DIR PORT        start a private nats-server on 127.0.0.1:PORT (log
#                              and pid file in DIR), wait until it greets a
#                              client, print nats://127.0.0.1:PORT
#   nats_stop DIR              stop the nats-server started in DIR, if running
#   bus_pid DIR NAME           print the pid of NAME (redis or nats) started in DIR
#
# The Debian package redis-server also installs a system service on port
# 6379; where an init system starts it, it runs beside ours and is not used.
#
# Messages go to stderr; only results (URLs, ports, pids) go to stdout.

# shellcheck source-path=SCRIPTDIR source=apt.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/apt.sh"

bus_msg() { printf 'bus.sh: %s\n' "$*" >&2; }

bus_redis_bin() { printf '%s\n' "${INGESTD_TEST_REDIS_SERVER:-/usr/bin/redis-server}"; }
bus_nats_bin() { printf '%s\n' "${INGESTD_TEST_NATS_SERVER:-/usr/sbin/nats-server}"; }

redis_ensure_installed() { apt_ensure bus.sh "Redis (redis-server)" redis-server "$(bus_redis_bin)"; }
nats_ensure_installed() { apt_ensure bus.sh "NATS (nats-server)" nats-server "$(bus_nats_bin)"; }

# Print a TCP port that is free on 127.0.0.1 right now.
bus_free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then printf '%s\n' "$p"; return 0; fi
    done
    bus_msg "no free port found"
    return 1
}

# bus_pid DIR NAME: the pid of the server NAME started in DIR, if it runs.
bus_pid() {
    local pidfile=$1/$2.pid pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

# bus_wait NAME DIR PORT PROBE: wait (bounded, 10 s) until PROBE PORT succeeds
# while the server started in DIR still runs.
bus_wait() {
    local name=$1 dir=$2 port=$3 probe=$4
    for _ in $(seq 1 100); do
        if ! bus_pid "$dir" "$name" >/dev/null; then
            bus_msg "$name exited on start; last lines of $dir/$name.log:"
            tail -n 20 "$dir/$name.log" >&2 2>/dev/null || true
            return 1
        fi
        "$probe" "$port" && return 0
        sleep 0.1
    done
    bus_msg "$name in $dir did not answer on 127.0.0.1:$port within 10 s; see $dir/$name.log"
    return 1
}

# Succeed if a Redis server answers PING on 127.0.0.1:PORT (a subshell: the
# caller's file descriptor 3 is left alone).
redis_answers() (
    local port=$1 reply
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    printf 'PING\r\n' >&3
    IFS= read -r -t 2 reply <&3 || reply=
    exec 3>&-
    [[ $reply == +PONG* ]]
)

# Succeed if a NATS server greets a client (INFO {...}) on 127.0.0.1:PORT.
nats_answers() (
    local port=$1 reply
    { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || return 1
    IFS= read -r -t 2 reply <&3 || reply=
    exec 3>&-
    [[ $reply == INFO* ]]
)

# bus_stop DIR NAME: TERM, then KILL after 5 s, the server NAME started in DIR.
bus_stop() {
    local dir=$1 name=$2 pid
    pid=$(bus_pid "$dir" "$name") || { rm -f "$dir/$name.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
}

# redis_start DIR PORT: a private redis-server: loopback only, no snapshots
# and no append-only file (the feed is pub/sub: nothing to keep), run in the
# background with its pid in DIR/redis.pid and its log in DIR/redis.log.
redis_start() {
    local dir=$1 port=$2 bin
    [[ -n $dir && -n $port ]] || { bus_msg "usage: redis_start DIR PORT"; return 1; }
    bin=$(bus_redis_bin)
    [[ -x $bin ]] || { bus_msg "$bin is missing (redis_ensure_installed installs it)"; return 1; }
    mkdir -p -- "$dir" || return 1
    dir=$(realpath -- "$dir")
    if bus_pid "$dir" redis >/dev/null; then
        bus_msg "a redis-server started in $dir already runs; stop it first (redis_stop $dir)"
        return 1
    fi
    bus_msg "starting redis-server on 127.0.0.1:$port (log: $dir/redis.log)"
    "$bin" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
        --dir "$dir" --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
    printf '%s\n' "$!" >"$dir/redis.pid"
    bus_wait redis "$dir" "$port" redis_answers || { bus_stop "$dir" redis; return 1; }
    printf 'redis://127.0.0.1:%s\n' "$port"
}

redis_stop() { bus_stop "$1" redis; }

# nats_start DIR PORT: a private nats-server on loopback (no JetStream: the
# feed is core pub/sub), pid in DIR/nats.pid, log in DIR/nats.log.
nats_start() {
    local dir=$1 port=$2 bin
    [[ -n $dir && -n $port ]] || { bus_msg "usage: nats_start DIR PORT"; return 1; }
    bin=$(bus_nats_bin)
    [[ -x $bin ]] || { bus_msg "$bin is missing (nats_ensure_installed installs it)"; return 1; }
    mkdir -p -- "$dir" || return 1
    dir=$(realpath -- "$dir")
    if bus_pid "$dir" nats >/dev/null; then
        bus_msg "a nats-server started in $dir already runs; stop it first (nats_stop $dir)"
        return 1
    fi
    bus_msg "starting nats-server on 127.0.0.1:$port (log: $dir/nats.log)"
    "$bin" -a 127.0.0.1 -p "$port" -l "$dir/nats.log" </dev/null >/dev/null 2>&1 &
    printf '%s\n' "$!" >"$dir/nats.pid"
    bus_wait nats "$dir" "$port" nats_answers || { bus_stop "$dir" nats; return 1; }
    printf 'nats://127.0.0.1:%s\n' "$port"
}

nats_stop() { bus_stop "$1" nats; }

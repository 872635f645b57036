#!/usr/bin/env bash
# Starts and stops a throw-away redis-server for tests.
#
#   scripts/redis.sh start [ENV_FILE]   # default ENV_FILE: target/redis/redis.env
#   scripts/redis.sh stop  [ENV_FILE]
#
# start: installs redis-server from the OS packages only when it is missing
# (apt-get), picks a free port on 127.0.0.1, starts redis-server without any
# persistence (--save '' --appendonly no) in a fresh temporary directory, waits
# until it answers PING, and writes ENV_FILE (sourceable) with
#   REDIS_PORT, REDIS_PID, REDIS_DIR, RTPD_TEST_REDIS_URL
# plus the pid in ENV_FILE.pid. It prints the same lines.
# Use: set -a; . ENV_FILE; set +a
# stop: kills that redis-server, removes its directory and both files.
# It never touches a Redis it did not start (e.g. one on 6379).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "redis.sh: $*" >&2; exit 1; }

install_if_missing() {
    if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "redis-server is missing and apt-get is not available; install Redis 6.2 or newer"
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    echo "redis.sh: installing redis-server (apt-get)" >&2
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq redis-server >&2 \
        || die "apt-get install redis-server failed"
}

# A port nothing listens on (bash's /dev/tcp; no other tool needed).
free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

start() {
    local env_file=$1 pid_file="$1.pid"
    if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        die "already running (pid $(cat "$pid_file")); run: $0 stop $env_file"
    fi
    install_if_missing
    mkdir -p "$(dirname "$env_file")"

    local attempt port dir pid=""
    for attempt in 1 2 3; do
        port=$(free_port)
        dir=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-redis.XXXXXX")
        touch "$dir/.rtpd-redis"
        # --daemonize no plus setsid: the server outlives this script and its
        # caller's job control, and $! is its pid.
        setsid redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" \
            --save '' --appendonly no --daemonize no --protected-mode yes \
            --logfile "$dir/redis.log" </dev/null >/dev/null 2>&1 &
        pid=$!
        for _ in $(seq 1 100); do
            if [[ "$(redis-cli -h 127.0.0.1 -p "$port" PING 2>/dev/null)" == PONG ]]; then
                break 2
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        echo "redis.sh: redis-server on port $port did not come up (attempt $attempt):" >&2
        tail -n 5 "$dir/redis.log" >&2 || true
        kill "$pid" 2>/dev/null || true
        rm -rf "$dir"
        pid=""
    done
    [[ -n "$pid" ]] || die "could not start redis-server"

    cat >"$env_file" <<ENV
REDIS_PORT=$port
REDIS_PID=$pid
REDIS_DIR=$dir
RTPD_TEST_REDIS_URL=redis://127.0.0.1:$port
ENV
    echo "$pid" >"$pid_file"
    cat "$env_file"
}

stop() {
    local env_file=$1 pid_file="$1.pid" pid dir=""
    [[ -f "$pid_file" ]] || { echo "redis.sh: not running ($pid_file missing)" >&2; return 0; }
    pid=$(cat "$pid_file")
    [[ -f "$env_file" ]] && dir=$(sed -n 's/^REDIS_DIR=//p' "$env_file")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    # Only ever remove a directory this script made.
    if [[ -n "$dir" && -f "$dir/.rtpd-redis" ]]; then
        rm -rf "$dir"
    fi
    rm -f "$env_file" "$pid_file"
}

cmd=${1:-}
env_file=${2:-$repo/target/redis/redis.env}
case "$cmd" in
    start) start "$env_file" ;;
    stop) stop "$env_file" ;;
    *) die "usage: $0 start|stop [ENV_FILE]" ;;
esac

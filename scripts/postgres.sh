#!/usr/bin/env bash
# Starts and stops a throw-away PostgreSQL server for tests and benchmarks.
#
#   scripts/postgres.sh start [ENV_FILE]   # default ENV_FILE: target/postgres/postgres.env
#   scripts/postgres.sh stop  [ENV_FILE]
#   scripts/postgres.sh down  [ENV_FILE]   # kill it as a crash would (pg_ctl -m immediate), keep the data
#   scripts/postgres.sh up    [ENV_FILE]   # start it again after `down`: same port, same data
#
# start: uses the machine's PostgreSQL binaries (Debian: /usr/lib/postgresql/<v>/bin),
# installing the `postgresql` package with apt-get only when there are none;
# runs initdb in a fresh temporary directory (as the `postgres` user when run
# as root, since initdb refuses root; the user is created if missing), starts
# the server with pg_ctl on a free port on 127.0.0.1 with pg_stat_statements
# loaded, creates the database `rtpd_test`, and writes ENV_FILE (sourceable) with
#   PG_PORT, PG_DIR, PG_BIN, PG_RUNAS, RTPD_TEST_POSTGRES_URL
# plus the postmaster pid in ENV_FILE.pid. It prints the same lines.
# Use: set -a; . ENV_FILE; set +a
# stop: stops that server, removes its directory and both files.
# It never touches a PostgreSQL it did not start (e.g. one on 5432).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bin() {
    local d
    for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/psql" ]] && { echo "$d"; return; }
    done
    if command -v pg_config >/dev/null; then
        d=$(pg_config --bindir)
        [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/psql" ]] && { echo "$d"; return; }
    fi
    return 1
}

install_if_missing() {
    find_bin >/dev/null && return
    command -v apt-get >/dev/null || die "PostgreSQL binaries are missing and apt-get is not available; install PostgreSQL 14 or newer"
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    echo "postgres.sh: installing postgresql (apt-get)" >&2
    "${sudo[@]}" apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq postgresql >&2 \
        || die "apt-get install postgresql failed"
    find_bin >/dev/null || die "postgresql installed but initdb/pg_ctl not found"
}

# initdb and the server refuse to run as root: run them as `postgres`.
runas_user() {
    if [[ $(id -u) -ne 0 ]]; then
        id -un
        return
    fi
    if ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres >&2 \
            || die "could not create the postgres user"
    fi
    echo postgres
}

as_user() {
    local user=$1; shift
    if [[ $user == "$(id -un)" ]]; then
        "$@"
    else
        runuser -u "$user" -- "$@"
    fi
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

pg_start() {
    local bin=$1 user=$2 dir=$3
    as_user "$user" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
}

start() {
    local env_file=$1 pid_file="$1.pid"
    if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        die "already running (pid $(cat "$pid_file")); run: $0 stop $env_file"
    fi
    install_if_missing
    local bin user
    bin=$(find_bin)
    user=$(runas_user)
    mkdir -p "$(dirname "$env_file")"

    local attempt port dir="" ok=""
    for attempt in 1 2 3; do
        port=$(free_port)
        dir=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-postgres.XXXXXX")
        touch "$dir/.rtpd-postgres"
        chown "$user" "$dir"
        chmod 700 "$dir"
        as_user "$user" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale \
            >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; rm -rf "$dir"; die "initdb failed"; }
        cat >>"$dir/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
max_connections = 300
shared_preload_libraries = 'pg_stat_statements'
pg_stat_statements.track = all
CONF
        if pg_start "$bin" "$user" "$dir"; then
            ok=1
            break
        fi
        echo "postgres.sh: server on port $port did not come up (attempt $attempt):" >&2
        tail -n 5 "$dir/server.log" >&2 || true
        as_user "$user" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$dir"
    done
    [[ -n "$ok" ]] || die "could not start PostgreSQL"
    "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE DATABASE rtpd_test" >/dev/null
    "$bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d rtpd_test -v ON_ERROR_STOP=1 \
        -c "CREATE EXTENSION pg_stat_statements" >/dev/null

    cat >"$env_file" <<ENV
PG_PORT=$port
PG_DIR=$dir
PG_BIN=$bin
PG_RUNAS=$user
RTPD_TEST_POSTGRES_URL=postgresql://postgres@127.0.0.1:$port/rtpd_test
ENV
    head -n 1 "$dir/data/postmaster.pid" >"$pid_file"
    cat "$env_file"
}

# Reads PG_DIR, PG_BIN, PG_RUNAS from ENV_FILE into the caller's variables.
load() {
    local env_file=$1
    [[ -f "$env_file" ]] || die "not running ($env_file missing)"
    dir=$(sed -n 's/^PG_DIR=//p' "$env_file")
    bin=$(sed -n 's/^PG_BIN=//p' "$env_file")
    user=$(sed -n 's/^PG_RUNAS=//p' "$env_file")
    [[ -n "$dir" && -f "$dir/.rtpd-postgres" ]] || die "$env_file does not name a server this script started"
}

down() {
    local dir bin user
    load "$1"
    as_user "$user" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null
}

up() {
    local dir bin user
    load "$1"
    pg_start "$bin" "$user" "$dir"
    head -n 1 "$dir/data/postmaster.pid" >"$1.pid"
}

stop() {
    local env_file=$1 pid_file="$1.pid" dir bin user
    [[ -f "$env_file" ]] || { echo "postgres.sh: not running ($env_file missing)" >&2; rm -f "$pid_file"; return 0; }
    load "$env_file"
    if [[ -f "$dir/data/postmaster.pid" ]]; then
        as_user "$user" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 \
            || as_user "$user" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    # Only ever remove a directory this script made.
    [[ -f "$dir/.rtpd-postgres" ]] && rm -rf "$dir"
    rm -f "$env_file" "$pid_file"
}

cmd=${1:-}
env_file=${2:-$repo/target/postgres/postgres.env}
case "$cmd" in
    start) start "$env_file" ;;
    stop) stop "$env_file" ;;
    down) down "$env_file" ;;
    up) up "$env_file" ;;
    *) die "usage: $0 start|stop|down|up [ENV_FILE]" ;;
esac

#!/usr/bin/env bash
# Starts and stops a throw-away Azurite blob emulator for tests.
#
#   scripts/azurite.sh start [ENV_FILE]   # default ENV_FILE: target/azurite/azurite.env
#   scripts/azurite.sh stop  [ENV_FILE]
#
# start: installs the pinned Azurite from azurite/package-lock.json (npm ci, only
# when node_modules is missing or stale), picks a free port on 127.0.0.1, starts
# azurite-blob on a fresh temporary data directory, waits until it answers, and
# writes ENV_FILE (sourceable) with
#   AZURITE_BLOB_PORT, AZURITE_PID, AZURITE_DATA_DIR,
#   RTPD_TEST_AZURITE_CONNECTION_STRING
# plus the pid in ENV_FILE.pid. It prints the same lines.
# Use: set -a; . ENV_FILE; set +a
# stop: kills that Azurite, removes its data directory and both files.
#
# Flags: --skipApiVersionCheck because azure_storage_blob 1.1 sends
# x-ms-version 2026-04-06, newer than the newest Azurite that runs on Node 20
# (3.35.0 knows up to 2025-11-05). Not --loose: the SDK sends nothing Azurite
# rejects. Shared-key and SAS signatures stay checked (the default).
# Needs only node and npm.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
azurite_dir="$repo/azurite"
# Azurite's documented development account (public, not a secret).
account=devstoreaccount1
account_key='Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=='

die() { echo "azurite.sh: $*" >&2; exit 1; }

install_if_stale() {
    command -v node >/dev/null || die "node is not installed"
    command -v npm >/dev/null || die "npm is not installed"
    local stamp="$azurite_dir/node_modules/.rtpd-lock-sha256" want
    want=$(node -e 'const c=require("crypto"),f=require("fs");console.log(c.createHash("sha256").update(f.readFileSync(process.argv[1])).update(f.readFileSync(process.argv[2])).digest("hex"))' \
        "$azurite_dir/package.json" "$azurite_dir/package-lock.json")
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$azurite_dir/node_modules/azurite/package.json" ]]; then
        return
    fi
    echo "azurite.sh: installing Azurite (npm ci)" >&2
    (cd "$azurite_dir" && npm ci --no-audit --no-fund --loglevel=error >&2) || die "npm ci failed"
    echo "$want" >"$stamp"
}

free_port() {
    node -e 'const s=require("net").createServer();s.listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

# Exit 0 as soon as anything answers HTTP on the port.
answers() {
    node -e '
        const req = require("http").get({host: "127.0.0.1", port: +process.argv[1], path: "/", timeout: 1000},
            res => { res.resume(); process.exit(0); });
        req.on("error", () => process.exit(1));
        req.on("timeout", () => { req.destroy(); process.exit(1); });' "$1"
}

start() {
    local env_file=$1 pid_file="$1.pid"
    if [[ -f "$pid_file" ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        die "already running (pid $(cat "$pid_file")); run: $0 stop $env_file"
    fi
    install_if_stale
    mkdir -p "$(dirname "$env_file")"
    local main="$azurite_dir/node_modules/azurite/dist/src/blob/main.js"
    [[ -f "$main" ]] || die "$main is missing; the pinned Azurite layout changed"

    # Azurite must outlive this script and its caller's terminal or job control.
    local launcher=(nohup)
    command -v setsid >/dev/null && launcher=(setsid)
    local attempt port data_dir pid=""
    for attempt in 1 2 3; do
        port=$(free_port)
        data_dir=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-azurite.XXXXXX")
        touch "$data_dir/.rtpd-azurite"
        "${launcher[@]}" node "$main" --blobHost 127.0.0.1 --blobPort "$port" --location "$data_dir" \
            --skipApiVersionCheck --disableTelemetry --silent \
            </dev/null >"$data_dir/azurite.log" 2>&1 &
        pid=$!
        local i
        for i in $(seq 1 300); do
            if ! kill -0 "$pid" 2>/dev/null; then break; fi
            if answers "$port"; then break 2; fi
            sleep 0.1
        done
        # Died (port taken between the probe and the bind?) or never answered: try again.
        kill "$pid" 2>/dev/null || true
        echo "azurite.sh: attempt $attempt on port $port failed:" >&2
        tail -n 5 "$data_dir/azurite.log" >&2 || true
        rm -rf "$data_dir"
        pid=""
    done
    [[ -n "$pid" ]] || die "Azurite did not start"

    local conn="DefaultEndpointsProtocol=http;AccountName=$account;AccountKey=$account_key;BlobEndpoint=http://127.0.0.1:$port/$account;"
    echo "$pid" >"$pid_file"
    {
        echo "AZURITE_BLOB_PORT=$port"
        echo "AZURITE_PID=$pid"
        echo "AZURITE_DATA_DIR='$data_dir'"
        echo "RTPD_TEST_AZURITE_CONNECTION_STRING='$conn'"
    } >"$env_file"
    cat "$env_file"
}

stop() {
    local env_file=$1 pid_file="$1.pid" pid="" data_dir=""
    [[ -f "$pid_file" ]] && pid=$(cat "$pid_file")
    if [[ -f "$env_file" ]]; then
        data_dir=$(sed -n "s/^AZURITE_DATA_DIR='\(.*\)'$/\1/p" "$env_file")
    fi
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        local i
        for i in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid"; fi
    fi
    # Only ever remove a directory this script created.
    if [[ -n "$data_dir" && -f "$data_dir/.rtpd-azurite" ]]; then
        rm -rf "$data_dir"
    fi
    rm -f "$pid_file" "$env_file"
    echo "azurite.sh: stopped${pid:+ (pid $pid)}"
}

cmd=${1:-}
env_file=${2:-$repo/target/azurite/azurite.env}
case "$cmd" in
    start) start "$env_file" ;;
    stop) stop "$env_file" ;;
    *) die "usage: $0 start|stop [ENV_FILE]" ;;
esac

#!/usr/bin/env bash
# Benchmarks with `rtpd produce` against a release build (not part of the tests).
#
#   scripts/bench.sh dev [COUNT] [CONCURRENCY]     rtpd dev: ack rate and latency, drain rate at 0 ms and 20 ms downstream
#   scripts/bench.sh azure [COUNT] [CONCURRENCY]   rtpd serve with the WAL on Azurite: group commit vs one PUT per transaction
#   scripts/bench.sh ledger [COUNT] [CONCURRENCY]  rtpd serve: embedded vs Redis vs PostgreSQL ledger, same run,
#                                                  with round trips per transaction for Redis and PostgreSQL
#   scripts/bench.sh otel [COUNT] [CONCURRENCY]    rtpd api: OTLP export off vs collector down vs a collector
#                                                  that accepts everything; ack rate, peak RSS, CPU per transaction
#   scripts/bench.sh otel-one off|down|up [COUNT] [CONCURRENCY]
#                                                  one such run, for an outside timer that alternates modes
#                                                  (prints one line: mode, ack/s, CPU µs per transaction, peak RSS)
#
# RTPD_BENCH_BIN=path/to/rtpd skips the release build and uses that binary;
# RTPD_BENCH_ROUNDS sets the rounds of the otel scenario (2).
#
# Each scenario starts its own processes on free ports with fresh data and stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-dev}
count=${2:-20000}
conc=${3:-64}

if [[ -n "${RTPD_BENCH_BIN:-}" ]]; then
    rtpd=$RTPD_BENCH_BIN
else
    cargo build --release --quiet --bin rtpd
    rtpd=$PWD/target/release/rtpd
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/rtpd-bench.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ -f "$work/azurite.env" ]] && scripts/azurite.sh stop "$work/azurite.env" >/dev/null 2>&1
    [[ -f "$work/redis.env" ]] && scripts/redis.sh stop "$work/redis.env" >/dev/null 2>&1
    [[ -f "$work/postgres.env" ]] && scripts/postgres.sh stop "$work/postgres.env" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_up() { for _ in $(seq 200); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "bench: $1 did not come up" >&2; exit 1; }
metric() { curl -s "$1/metrics" | python3 -c "import json,sys;print(json.load(sys.stdin)['$2'])"; }

# start_service NAME ENV... : rtpd serve (or dev) on a free port; sets $api
start_serve() {
    local port; port=$(free_port)
    api=http://127.0.0.1:$port
    env RTPD_HTTP_ADDR=127.0.0.1:$port RTPD_DATA_DIR="$work/data-$1" RTPD_AUTH=none RTPD_LOG_LEVEL=warn \
        RTPD_DOWNSTREAM_URL="$downstream" "${@:2}" "$rtpd" "${serve_cmd:-serve}" >"$work/$1.log" 2>&1 &
    pids+=($!)
    serve_pid=$!
    wait_up "$api/healthz"
}

start_mock() {
    local port; port=$(free_port)
    downstream=http://127.0.0.1:$port/process
    "$rtpd" mock-downstream --addr 127.0.0.1:$port --success-rate 1 --latency-ms "$1" >/dev/null 2>&1 &
    pids+=($!)
    wait_up "http://127.0.0.1:$port/healthz"
}

# produce PREFIX [COUNT [CONCURRENCY [more rtpd produce flags]]]
produce() { "$rtpd" produce --url "$api" --quiet --prefix "$1" --count "${2:-$count}" --concurrency "${3:-$conc}" "${@:4}"; }

# drain SECONDS_START: waits until success == total; prints the processing rate
drain() {
    local start=$1 total
    while :; do
        total=$(metric "$api" total)
        [[ "$(metric "$api" success)" == "$total" ]] && break
        sleep 0.2
    done
    python3 -c "import time;t=time.time()-$start;print(f'drained {$total} in {t:.1f}s: {$total/t:.0f} processed/s')"
}

case $what in
dev)
    for latency in 0 20; do
        echo "== rtpd dev, mock downstream latency ${latency} ms, $count transactions, concurrency $conc"
        port=$(free_port); api=http://127.0.0.1:$port
        RTPD_HTTP_ADDR=127.0.0.1:$port RTPD_DATA_DIR="$work/dev$latency" RTPD_LOG_LEVEL=warn \
            "$rtpd" dev --mock-addr "127.0.0.1:$(free_port)" --mock-success-rate 1 --mock-latency-ms "$latency" \
            >"$work/dev$latency.log" 2>&1 &
        pids+=($!)
        wait_up "$api/healthz"
        key=$(python3 -c "import json;print(json.load(open('$work/dev$latency/dev-credentials.json'))['api_key'])")
        t0=$(date +%s.%N)
        produce "D$latency" "$count" "$conc" --api-key "$key"
        drain "$t0"
        kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
    done
    ;;
azure)
    scripts/azurite.sh start "$work/azurite.env" >/dev/null
    set -a; . "$work/azurite.env"; set +a
    start_mock 0
    echo "== WAL on Azurite, group commit (default), $count transactions, concurrency $conc"
    start_serve gc RTPD_WAL=azure RTPD_STORAGE_CONNECTION_STRING="$RTPD_TEST_AZURITE_CONNECTION_STRING" RTPD_WAL_CONTAINER=bench-gc
    produce GC | tee "$work/gc.out"
    half=$(sed -n 's/.*acknowledged (\([0-9]*\)\/s).*/\1/p' "$work/gc.out"); half=$((half / 2))
    echo "== same, rate-limited to half that maximum ($half/s)"
    produce GCH "$count" "$conc" --rate "$half"
    kill "${pids[1]}"; wait "${pids[1]}" 2>/dev/null || true
    echo "== baseline: one PUT per transaction (RTPD_WAL_BATCH_MAX_RECORDS=1, $conc flushers)"
    start_serve one RTPD_WAL=azure RTPD_STORAGE_CONNECTION_STRING="$RTPD_TEST_AZURITE_CONNECTION_STRING" RTPD_WAL_CONTAINER=bench-one \
        RTPD_WAL_BATCH_MAX_RECORDS=1 RTPD_WAL_FLUSHERS="$conc"
    produce ONE $((count / 4))
    ;;
ledger)
    scripts/redis.sh start "$work/redis.env" >/dev/null
    scripts/postgres.sh start "$work/postgres.env" >/dev/null
    set -a; . "$work/redis.env"; . "$work/postgres.env"; set +a
    pg() { "$PG_BIN/psql" -At -q "$RTPD_TEST_POSTGRES_URL" -c "$1"; }
    start_mock 0
    echo "== embedded ledger, $count transactions, concurrency $conc"
    start_serve local
    t0=$(date +%s.%N); produce LOC; drain "$t0"
    kill "$serve_pid"
    echo "== Redis ledger"
    start_serve redis RTPD_LEDGER=redis RTPD_REDIS_URL="$RTPD_TEST_REDIS_URL" RTPD_REDIS_KEY_PREFIX="bench$$"
    t0=$(date +%s.%N); produce RED; drain "$t0"
    # Round trips: the commands the service sends for a sample of 1,000 more
    # (MONITOR, which slows Redis, so not during the timed run). Commands run
    # inside scripts are marked "lua" and are not round trips; the hot path is
    # HGETALL (get) and the 8-key transition scripts (register, claim, settle).
    redis-cli -p "$REDIS_PORT" MONITOR >"$work/monitor.txt" &
    mon=$!
    sleep 0.5
    produce REDM 1000 >/dev/null; drain "$(date +%s.%N)" >/dev/null
    kill "$mon"
    python3 - "$work/monitor.txt" <<'PY'
import re, sys
client = [l for l in open(sys.argv[1]) if '] "' in l and '[0 lua]' not in l and ' lua]' not in l]
hot = sum(1 for l in client if re.search(r'\] "(?i:hgetall)"', l) or re.search(r'"(?i:evalsha)" "[0-9a-f]{40}" "8"', l))
print(f"Redis round trips per transaction: {hot / 1000:.2f} on the hot path; all commands sent: {len(client) / 1000:.2f} (with /metrics polls and the reconciler)")
PY
    kill "$serve_pid"
    echo "== PostgreSQL ledger"
    start_serve postgres RTPD_LEDGER=postgres RTPD_POSTGRES_URL="$RTPD_TEST_POSTGRES_URL"
    pg "SELECT pg_stat_statements_reset()" >/dev/null
    t0=$(date +%s.%N); produce PG; drain "$t0"
    # Top-level statements of the service's database, by ledger call; one
    # round trip each (prepared once per pooled connection).
    pg "SELECT CASE WHEN query LIKE 'WITH claimed%' THEN 'claim'
                    WHEN query LIKE 'WITH settled%' THEN 'settle'
                    WHEN query LIKE 'INSERT INTO transactions%DO NOTHING RETURNING%' THEN 'register'
                    WHEN query LIKE 'SELECT transaction_id%FROM transactions WHERE transaction_id = \$1' THEN 'get'
                    ELSE 'other' END, sum(calls)
        FROM pg_stat_statements
        WHERE toplevel AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
          AND query NOT LIKE '%pg_stat_statements%'
        GROUP BY 1 ORDER BY 1" | python3 -c "
import sys
calls = dict((k, int(v)) for k, v in (l.split('|') for l in sys.stdin.read().split()))
ops = ('get', 'register', 'claim', 'settle')
hot, other = sum(calls.get(k, 0) for k in ops), calls.get('other', 0)
print(f'PostgreSQL round trips per transaction: {hot / $count:.2f} on the hot path (' + ', '.join(f'{k} {calls.get(k, 0) / $count:.2f}' for k in ops) + f'); other statements (reconciler, /metrics polls, retention): {other / $count:.2f}')"
    ;;
otel-one)
    # Arguments shift: MODE COUNT CONCURRENCY.
    mode=${2:?otel-one needs off, down or up}
    count=${3:-20000}
    conc=${4:-64}
    start_mock 0
    sink_port=$(free_port)
    if [[ $mode == up ]]; then
        python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$sink_port" &
        pids+=($!)
    fi
    case $mode in
    off) otel=() ;;
    down | up) otel=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" OTEL_METRIC_EXPORT_INTERVAL=5000) ;;
    *) echo "bench: otel-one off|down|up" >&2; exit 2 ;;
    esac
    serve_cmd=api
    tick=$(getconf CLK_TCK)
    start_serve "otel-$mode" "${otel[@]}"
    produce "W$mode" 2000 >/dev/null
    sleep 2
    t0=$(awk '{print $14 + $15}' "/proc/$serve_pid/stat")
    s0=$(date +%s.%N)
    produce "O$mode" >/dev/null
    s1=$(date +%s.%N)
    cpu=$(( ($(awk '{print $14 + $15}' "/proc/$serve_pid/stat") - t0) * 1000000 / tick / count ))
    python3 -c "print(f'$mode ack/s {$count / ($s1 - $s0):.0f} cpu_us_per_tx $cpu', end=' ')"
    echo "peak_rss $(awk '/VmHWM/ {print $2 $3}' "/proc/$serve_pid/status")"
    kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
    ;;
otel)
    start_mock 0
    # A collector that takes everything (200 to any POST), for "exporter on".
    sink_port=$(free_port)
    python3 -c '
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()' "$sink_port" &
    pids+=($!)
    dead_port=$(free_port)   # nothing listens there: connection refused
    serve_cmd=api            # ingest alone: the processor would compete for the CPU
    tick=$(getconf CLK_TCK)
    for round in $(seq "${RTPD_BENCH_ROUNDS:-2}"); do
        for mode in off down up; do
            case $mode in
            off) otel=() ;;
            down) otel=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$dead_port" OTEL_METRIC_EXPORT_INTERVAL=5000) ;;
            up) otel=(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" OTEL_METRIC_EXPORT_INTERVAL=5000) ;;
            esac
            echo "== OTLP export $mode (round $round), $count transactions, concurrency $conc"
            start_serve "otel-$mode-$round" "${otel[@]}"
            # Warm-up: the service has met its collector (or found it dead)
            # before the measured run, as a long-running one has.
            produce "W$mode$round" 2000 >/dev/null
            sleep 2
            ticks() { awk '{print $14 + $15}' "/proc/$serve_pid/stat"; }
            t0=$(ticks)
            produce "O$mode$round"
            cpu=$(( ($(ticks) - t0) * 1000000 / tick / count ))
            echo "peak RSS: $(awk '/VmHWM/ {print $2 " " $3}' "/proc/$serve_pid/status"); CPU per transaction: ${cpu} µs"
            kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true
        done
    done
    ;;
*)
    echo "usage: scripts/bench.sh dev|azure|ledger|otel [COUNT] [CONCURRENCY] | otel-one off|down|up [COUNT] [CONCURRENCY]" >&2
    exit 2
    ;;
esac

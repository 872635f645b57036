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
#   scripts/bench.sh stack [COUNT] [CONCURRENCY]   the production-shaped stack: Azurite WAL, Redis ledger, the
#                                                  in-repo Service Bus broker, mock downstream at 0 ms; `rtpd api` +
#                                                  `rtpd processor` split, and `rtpd serve` in one process; acks/s,
#                                                  ack p50/p99, p99 at half that rate, drain rate (tx/s end to end)
#                                                  and rtpd CPU µs per transaction per process (/proc/<pid>/stat);
#                                                  Microsoft's Python SDK sending to the same broker as a reference
#   scripts/bench.sh cpu [COUNT] [CONCURRENCY]     rtpd dev end to end (embedded backends): rtpd CPU µs per
#                                                  transaction, next to the floor measured in the same run: the
#                                                  CPU per request of a bare actix POST handler (the mock
#                                                  downstream, run as its own process, answering rtpd's calls)
#   scripts/bench.sh kafka [COUNT] [CONCURRENCY]   rtpd dev --kafka (embedded backends and an embedded Kafka
#                                                  broker): records/s through the Kafka intake until the ledger
#                                                  holds them all, next to the API's acknowledged POSTs/s in the
#                                                  same process, alternating which goes first
#
# RTPD_BENCH_BIN=path/to/rtpd skips the release build and uses that binary;
# RTPD_BENCH_ROUNDS sets the rounds of the otel and stack scenarios (2).
# stack: RTPD_BENCH_BROKER_BIN=path/to/sb-test-broker skips building the broker;
# RTPD_BENCH_BASELINE_BIN="path/to/other/rtpd [label:path ...]" runs every
# configuration with those binaries too, interleaved, so before/after ratios
# come from the same run (the one labelled baseline runs `serve` with
# RTPD_BENCH_BASELINE_COUNT transactions, default a tenth of COUNT);
# RTPD_BENCH_MODES="split serve" picks the configurations (even rounds run
# the binaries and the modes in reverse order: Azurite slows as it fills, so
# compare builds over an even number of rounds);
# RTPD_BENCH_PYTHON=path/to/python (with azure-servicebus) adds the SDK reference.
# stack, cpu: RTPD_BENCH_PERF=DIR records a CPU profile of each measured rtpd
# process while it ingests and drains (perf record -e cpu-clock -g; the
# reports land in DIR/<configuration>-<process>.txt); RTPD_BENCH_PERF_FREQ
# sets the sampling rate (499 Hz) and RTPD_BENCH_PERF_CALLGRAPH the call-graph
# mode (-g; the release build has no frame pointers, so callers need
# "--call-graph=dwarf,16384" and a lower rate).
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

tick=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
us_per_tx() { echo $(( ($2 - $1) * 1000000 / tick / $3 )); }

# perf_start NAME PID...: with RTPD_BENCH_PERF, a CPU profile of each process
# (NAME-<pid>); perf_stop writes the reports.
perf_pids=()
perf_start() {
    [[ -n "${RTPD_BENCH_PERF:-}" ]] || return 0
    mkdir -p "$RTPD_BENCH_PERF"
    local name=$1 p; shift
    for p in "$@"; do
        perf record -q -e cpu-clock -F "${RTPD_BENCH_PERF_FREQ:-499}" ${RTPD_BENCH_PERF_CALLGRAPH:--g} -o "$RTPD_BENCH_PERF/$name-${p%%:*}.data" -p "${p#*:}" 2>/dev/null &
        perf_pids+=($!)
    done
    sleep 0.5
}
perf_stop() {
    [[ -n "${RTPD_BENCH_PERF:-}" ]] || return 0
    local p f
    for p in "${perf_pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    perf_pids=()
    for f in "$RTPD_BENCH_PERF"/*.data; do
        [[ -f ${f%.data}.txt ]] && continue
        perf report -i "$f" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^$' | head -400 >"${f%.data}.txt" || true
    done
}

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
kafka)
    port=$(free_port); api=http://127.0.0.1:$port
    RTPD_HTTP_ADDR=127.0.0.1:$port RTPD_DATA_DIR="$work/kafka" RTPD_LOG_LEVEL=warn \
        "$rtpd" dev --kafka --mock-addr "127.0.0.1:$(free_port)" --mock-success-rate 1 \
        >"$work/kafka.log" 2>&1 &
    pids+=($!)
    wait_up "$api/healthz"
    for _ in $(seq 100); do grep -q 'Kafka intake' "$work/kafka.log" && break; sleep 0.1; done
    servers=$(sed -n 's/.*Kafka intake *\([^ ]*\) topics.*/\1/p' "$work/kafka.log")
    [[ -n $servers ]] || { echo "bench: rtpd dev --kafka printed no broker address" >&2; exit 1; }
    key=$(python3 -c "import json;print(json.load(open('$work/kafka/dev-credentials.json'))['api_key'])")
    # The consumer joins its group before the first timed run.
    produce KW 200 8 --kafka "$servers" >/dev/null
    for round in $(seq "${RTPD_BENCH_ROUNDS:-2}"); do
        order="http kafka"; ((round % 2 == 0)) && order="kafka http"
        for way in $order; do
            echo "== round $round, $way: $count transactions"
            if [[ $way == http ]]; then
                produce "H$round" "$count" "$conc" --api-key "$key"
            else
                produce "K$round" "$count" "$conc" --kafka "$servers"
            fi
        done
    done
    ;;
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
stack)
    if [[ -n "${RTPD_BENCH_BROKER_BIN:-}" ]]; then
        broker=$RTPD_BENCH_BROKER_BIN
    else
        cargo build --release --quiet -p sb-test-broker
        broker=$PWD/target/release/sb-test-broker
    fi
    scripts/azurite.sh start "$work/azurite.env" >/dev/null
    scripts/redis.sh start "$work/redis.env" >/dev/null
    set -a; . "$work/azurite.env"; . "$work/redis.env"; set +a
    rounds=${RTPD_BENCH_ROUNDS:-2}
    modes=${RTPD_BENCH_MODES:-split serve}
    bins=("this:$rtpd")
    for b in ${RTPD_BENCH_BASELINE_BIN:-}; do
        [[ $b == *:* ]] && bins+=("$b") || bins+=("baseline:$b")
    done
    queues=(--queue sdk-single --queue sdk-batch)
    for round in $(seq "$rounds"); do
        for b in "${bins[@]}"; do for mode in $modes; do queues+=(--queue "q-${b%%:*}-$mode-$round"); done; done
    done
    "$broker" --port 0 "${queues[@]}" >"$work/broker.out" 2>"$work/broker.log" &
    pids+=($!)
    for _ in $(seq 100); do grep -q '^listening on' "$work/broker.out" && break; sleep 0.1; done
    sb=$(sed -n 's/^listening on //p' "$work/broker.out")
    [[ -n "$sb" ]] || { echo "bench: the broker did not start" >&2; exit 1; }
    sbconn="Endpoint=sb://$sb;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
    start_mock 0
    results=()
    for round in $(seq "$rounds"); do
        # The run's one Azurite slows as it fills, so what runs first does
        # better: even rounds run the binaries and the modes in reverse.
        round_bins=("${bins[@]}"); round_modes=($modes)
        if ((round % 2 == 0)); then
            round_bins=(); for ((i = ${#bins[@]} - 1; i >= 0; i--)); do round_bins+=("${bins[$i]}"); done
            m=($modes); round_modes=(); for ((i = ${#m[@]} - 1; i >= 0; i--)); do round_modes+=("${m[$i]}"); done
        fi
        for b in "${round_bins[@]}"; do
            label=${b%%:*}
            for mode in "${round_modes[@]}"; do
                # A baseline's serve may be slow (the collapse of issue 14): fewer transactions.
                n=$count; [[ $label == baseline && $mode == serve ]] && n=${RTPD_BENCH_BASELINE_COUNT:-$((count / 10))}
                name=$label-$mode-$round
                stack=(RTPD_WAL=azure RTPD_STORAGE_CONNECTION_STRING="$RTPD_TEST_AZURITE_CONNECTION_STRING" RTPD_WAL_CONTAINER="bench-$name"
                    RTPD_LEDGER=redis RTPD_REDIS_URL="$RTPD_TEST_REDIS_URL" RTPD_REDIS_KEY_PREFIX="bench-$name-$$"
                    RTPD_QUEUE=servicebus RTPD_SERVICEBUS_CONNECTION_STRING="$sbconn" RTPD_SERVICEBUS_QUEUE="q-$name")
                rtpd_saved=$rtpd; rtpd=${b#*:}
                echo "== $name: $( [[ $mode == split ]] && echo 'rtpd api + rtpd processor' || echo 'rtpd serve'), $n transactions, concurrency $conc ($rtpd)"
                procs=()
                if [[ $mode == split ]]; then
                    serve_cmd=processor start_serve "$name-processor" "${stack[@]}"
                    procs+=("processor:$serve_pid")
                    serve_cmd=api start_serve "$name-api" "${stack[@]}"
                    procs+=("api:$serve_pid")
                else
                    serve_cmd=serve start_serve "$name" "${stack[@]}"
                    procs+=("serve:$serve_pid")
                fi
                perf_start "$name" "${procs[@]}"
                before=(); for p in "${procs[@]}"; do before+=("$(ticks "${p#*:}")"); done
                t0=$(date +%s.%N)
                produce "S$name" "$n" | tee "$work/$name.out"
                drain "$t0" | tee "$work/$name.drain"
                perf_stop
                cpu=(); total_us=0; i=0
                for p in "${procs[@]}"; do
                    us=$(us_per_tx "${before[$i]}" "$(ticks "${p#*:}")" "$n")
                    cpu+=("${p%%:*} $us"); total_us=$((total_us + us)); i=$((i + 1))
                done
                echo "rtpd CPU per transaction: ${cpu[*]} µs (total $total_us µs)"
                acks=$(sed -n 's/.*acknowledged (\([0-9]*\)\/s).*/\1/p' "$work/$name.out")
                p50=$(sed -n 's/.*p50 \([0-9.]*\) .*/\1/p' "$work/$name.out")
                p99=$(sed -n 's/.*p99 \([0-9.]*\) .*/\1/p' "$work/$name.out")
                drained=$(sed -n 's/.*: \([0-9]*\) processed\/s/\1/p' "$work/$name.drain")
                half=$((acks / 2)); [[ $half -lt 1 ]] && half=1
                hcount=$((half * 3)); [[ $hcount -gt $n ]] && hcount=$n
                produce "H$name" "$hcount" "$conc" --rate "$half" >"$work/$name.half"
                hp99=$(sed -n 's/.*p99 \([0-9.]*\) .*/\1/p' "$work/$name.half")
                echo "at half that rate ($half/s, $hcount transactions): ack p99 $hp99 ms"
                results+=("| $name | $acks | $p50 | $p99 | $hp99 | $drained | ${cpu[*]} | $total_us |")
                for p in "${procs[@]}"; do kill "${p#*:}" 2>/dev/null || true; wait "${p#*:}" 2>/dev/null || true; done
                rtpd=$rtpd_saved
            done
        done
    done
    if [[ -n "${RTPD_BENCH_PYTHON:-}" ]]; then
        echo "== Microsoft's Python SDK against the same broker"
        "$RTPD_BENCH_PYTHON" - "$sbconn" "$count" <<'PY'
import sys, time
from azure.servicebus import ServiceBusClient, ServiceBusMessage
conn, count = sys.argv[1], int(sys.argv[2])
body = "x" * 300
with ServiceBusClient.from_connection_string(conn) as client:
    with client.get_queue_sender("sdk-single") as s:
        s.send_messages(ServiceBusMessage(body))
        n = min(count, 5000); t = time.perf_counter()
        for i in range(n):
            s.send_messages(ServiceBusMessage(body, message_id=f"one-{i}"))
        print(f"SDK, one message per send, sequential: {n / (time.perf_counter() - t):.0f} msg/s")
    with client.get_queue_sender("sdk-batch") as s:
        t = time.perf_counter()
        for start in range(0, count, 100):
            batch = s.create_message_batch()
            for i in range(start, min(start + 100, count)):
                batch.add_message(ServiceBusMessage(body, message_id=f"batch-{i}"))
            s.send_messages(batch)
        print(f"SDK, batches of 100: {count / (time.perf_counter() - t):.0f} msg/s")
PY
    fi
    echo
    echo "| configuration | acks/s | ack p50 ms | ack p99 ms | p99 at half rate ms | drained tx/s | rtpd CPU µs/tx by process | total µs/tx |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
    ;;
cpu)
    rounds=${RTPD_BENCH_ROUNDS:-2}
    results=()
    for round in $(seq "$rounds"); do
        echo "== rtpd dev (round $round), mock downstream as its own process at 0 ms, $count transactions, concurrency $conc"
        start_mock 0
        mock_pid=${pids[-1]}
        port=$(free_port); api=http://127.0.0.1:$port
        RTPD_HTTP_ADDR=127.0.0.1:$port RTPD_DATA_DIR="$work/cpu$round" RTPD_LOG_LEVEL=warn RTPD_DOWNSTREAM_URL="$downstream" \
            "$rtpd" dev --no-mock >"$work/cpu$round.log" 2>&1 &
        pids+=($!); dev_pid=$!
        wait_up "$api/healthz"
        key=$(python3 -c "import json;print(json.load(open('$work/cpu$round/dev-credentials.json'))['api_key'])")
        perf_start "cpu-$round" "dev:$dev_pid" "mock:$mock_pid"
        d0=$(ticks "$dev_pid"); m0=$(ticks "$mock_pid")
        t0=$(date +%s.%N)
        produce "C$round" "$count" "$conc" --api-key "$key" | tee "$work/cpu$round.out"
        drain "$t0" | tee "$work/cpu$round.drain"
        perf_stop
        dev_us=$(us_per_tx "$d0" "$(ticks "$dev_pid")" "$count")
        mock_us=$(us_per_tx "$m0" "$(ticks "$mock_pid")" "$count")
        acks=$(sed -n 's/.*acknowledged (\([0-9]*\)\/s).*/\1/p' "$work/cpu$round.out")
        drained=$(sed -n 's/.*: \([0-9]*\) processed\/s/\1/p' "$work/cpu$round.drain")
        echo "rtpd dev CPU per transaction: $dev_us µs; bare actix POST handler (the mock) per request: $mock_us µs"
        results+=("| $round | $acks | $drained | $dev_us | $mock_us | $(python3 -c "print(f'{$dev_us/max($mock_us,1):.1f}')") |")
        kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
    done
    echo
    echo "| round | acks/s | drained tx/s | rtpd dev CPU µs/tx | bare POST handler CPU µs/request | ratio |"
    echo "|---|---|---|---|---|---|"
    printf '%s\n' "${results[@]}"
    ;;
*)
    echo "usage: scripts/bench.sh dev|azure|ledger|otel|stack|cpu [COUNT] [CONCURRENCY] | otel-one off|down|up [COUNT] [CONCURRENCY]" >&2
    exit 2
    ;;
esac

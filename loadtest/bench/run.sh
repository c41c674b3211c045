#!/usr/bin/env bash
# Reruns the single-node benchmarks of docs/BENCHMARKS.md: every measurement RUNS times (default
# 3) against a fresh gateway process (so memory growth starts from an empty node), then prints the
# median of each figure. Results (JSON + SVG per run) go to $OUT (default bench-results/).
#
#   cargo build --release -p imgate -p imgate-loadtest
#   loadtest/bench/run.sh all            # or: connect | chat | broadcast | socketio | cluster
#
# Environment (not IMGATE_*: the gateway reads those): GATEWAY_BIN, LOADTEST_BIN (default target/release/...; honours CARGO_TARGET_DIR), RUNS,
# OUT, CLIENT_PORT (17400), ADMIN_PORT (17401), CONNECTIONS (15000), CHAT_USERS (2000),
# CHAT_RATES ("10000 20000 30000"), SIO_CHAT_RATES ("5000 10000"), CHAT_SECS (10), BCAST_CLIENTS (15000), BCAST_COUNT (40).
# Before each run it waits until MariaDB and Redis are idle; QUIET_LOAD=1.5 also waits for the
# machine's load average to drop below 1.5.
# Needs jq and curl; the socketio part needs node/npm and Redis at 127.0.0.1:6379.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
GATEWAY_BIN=${GATEWAY_BIN:-$TARGET/release/imgate}
LOADTEST_BIN=${LOADTEST_BIN:-$TARGET/release/imgate-loadtest}
RUNS=${RUNS:-3}
OUT=${OUT:-bench-results}
CP=${CLIENT_PORT:-17400}
AP=${ADMIN_PORT:-17401}
N=${CONNECTIONS:-15000}
CHAT_USERS=${CHAT_USERS:-2000}
CHAT_RATES=${CHAT_RATES:-"10000 20000 30000"}
CHAT_SECS=${CHAT_SECS:-10}
SIO_CHAT_RATES=${SIO_CHAT_RATES:-"5000 10000"}
BCAST_CLIENTS=${BCAST_CLIENTS:-15000}
BCAST_COUNT=${BCAST_COUNT:-40}
ADMIN=http://127.0.0.1:$AP
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

GW_PID=
GW_DIR=
stop_gateway() {
    if [ -n "$GW_PID" ]; then
        kill "$GW_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$GW_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$GW_PID" 2>/dev/null || true
        GW_PID=
    fi
    if [ -n "$GW_DIR" ]; then rm -rf "$GW_DIR"; GW_DIR=; fi
}
cleanup() {
    stop_gateway
    if [ -n "${SIO_STARTED:-}" ]; then "$ROOT/loadtest/peers/socketio/run.sh" stop; fi
}
trap cleanup EXIT

# A fresh gateway with the embedded defaults, in a temp directory of its own (its SQLite file).
start_gateway() {
    wait_quiet
    for _ in $(seq 100); do
        ss -ltn | grep -qE "127.0.0.1:($CP|$AP) " || break
        sleep 0.1
    done
    GW_DIR=$(mktemp -d)
    (cd "$GW_DIR" && IMGATE_CLIENT__MAX_CONNECTIONS=200000 exec "$GATEWAY_BIN" \
        --client-listen 127.0.0.1:$CP --admin-listen 127.0.0.1:$AP >"$GW_DIR/gateway.log" 2>&1) &
    GW_PID=$!
    for _ in $(seq 100); do curl -fsS "$ADMIN/readyz" >/dev/null 2>&1 && return; sleep 0.1; done
    echo "the gateway did not start:" >&2
    cat "$GW_DIR/gateway.log" >&2
    exit 1
}

lt() { "$LOADTEST_BIN" "$@" --quiet --max-runtime 300; }

# median FILES... JQ-EXPRESSION
median() {
    local expr=${*: -1}
    jq -s "[.[] | $expr] | sort | .[(length / 2 | floor)]" "${@:1:$#-1}"
}

load() { cut -d' ' -f1 /proc/loadavg; }

# With QUIET_LOAD set (e.g. 1.5), wait (at most QUIET_WAIT seconds, default 300) until the
# machine's 1-minute load average drops below it before each run: on a shared machine other
# tenants' builds otherwise dominate the latencies.
wait_quiet() {
    services_idle
    [ -n "${QUIET_LOAD:-}" ] || return 0
    local waited=0
    while awk -v l="$(load)" -v q="$QUIET_LOAD" 'BEGIN { exit !(l >= q) }'; do
        [ "$waited" -ge "${QUIET_WAIT:-300}" ] && { echo "(load still $(load) after ${waited}s; running anyway)"; return 0; }
        sleep 5
        waited=$((waited + 5))
    done
}

# CPU ticks (1/100 s) used by MariaDB and Redis so far.
service_ticks() {
    local pid total=0
    for pid in $(pgrep -x mariadbd) $(pgrep -x mysqld) $(pgrep -x redis-server); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# Waits (at most 120 s) until MariaDB and Redis use less than a tenth of a core: after a heavy run
# MariaDB goes on flushing and purging for a while, and would take CPU from the next run.
services_idle() {
    local i a b
    for i in $(seq 60); do
        a=$(service_ticks); sleep 2; b=$(service_ticks)
        [ $((b - a)) -lt 20 ] && return 0
    done
    echo "(MariaDB and Redis still busy after 120 s; running anyway)"
}

connect() {
    for transport in tcp ws; do
        if [ "$transport" = tcp ]; then target=tcp://127.0.0.1:$CP; else target=ws://127.0.0.1:$CP/ws; fi
        for run in $(seq "$RUNS"); do
            start_gateway
            echo "== connect $transport run $run (load $(load))"
            lt connect --targets "$target" -n "$N" --rate 20000 --max-inflight 100 --hold 6 \
                --settle 3 --admin "$ADMIN" --gateway-pid "$GW_PID" \
                --out "$OUT/connect-$transport-$run.json"
            stop_gateway
        done
        f=("$OUT"/connect-$transport-*.json)
        echo "connect $transport medians: memory/conn $(median "${f[@]}" '.memory.per_connection_bytes') B," \
            "login rate $(median "${f[@]}" '.connections.login_rate_per_s')/s," \
            "login p99 $(median "${f[@]}" '.connections.login_latency.p99_ms') ms," \
            "gateway CPU/login $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
    done
}

chat() {
    for rate in $CHAT_RATES; do
        for run in $(seq "$RUNS"); do
            start_gateway
            echo "== chat $rate msg/s run $run (load $(load))"
            lt chat --targets tcp://127.0.0.1:$CP -n "$CHAT_USERS" --rate "$rate" \
                --duration "$CHAT_SECS" --gateway-pid "$GW_PID" --out "$OUT/chat-$rate-$run.json"
            stop_gateway
        done
        f=("$OUT"/chat-$rate-*.json)
        echo "chat $rate medians: received/s $(median "${f[@]}" '.chat.throughput_per_s')," \
            "lost $(median "${f[@]}" '.chat.lost'), p50 $(median "${f[@]}" '.chat.latency.p50_ms') ms," \
            "p99 $(median "${f[@]}" '.chat.latency.p99_ms') ms, p99.9 $(median "${f[@]}" '.chat.latency.p999_ms') ms," \
            "gateway CPU/msg $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
    done
}

broadcast() {
    for run in $(seq "$RUNS"); do
        start_gateway
        echo "== broadcast run $run (load $(load))"
        lt broadcast --targets tcp://127.0.0.1:$CP -n "$BCAST_CLIENTS" --count "$BCAST_COUNT" \
            --admin "$ADMIN" --gateway-pid "$GW_PID" --out "$OUT/broadcast-$run.json"
        stop_gateway
    done
    f=("$OUT"/broadcast-*.json)
    echo "broadcast medians: deliveries/s $(median "${f[@]}" '.broadcast.deliveries_per_s')," \
        "lost $(median "${f[@]}" '.broadcast.lost'), p50 $(median "${f[@]}" '.broadcast.latency.p50_ms') ms," \
        "p99 $(median "${f[@]}" '.broadcast.latency.p99_ms') ms," \
        "gateway CPU/delivery $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
}

socketio() {
    local peer=$ROOT/loadtest/peers/socketio/run.sh
    for run in $(seq "$RUNS"); do
        "$peer" stop
        SIO_STARTED=1
        wait_quiet
        "$peer" start >/dev/null
        echo "== socket.io connect run $run (load $(load))"
        lt connect --target-kind socketio --targets "$("$peer" targets)" -n "$N" --rate 20000 \
            --max-inflight 100 --hold 6 --settle 3 --gateway-pid "$("$peer" pids)" \
            --out "$OUT/sio-connect-$run.json"
        "$peer" stop
    done
    f=("$OUT"/sio-connect-*.json)
    echo "socket.io connect medians: memory/conn $(median "${f[@]}" '.memory.per_connection_bytes') B," \
        "login rate $(median "${f[@]}" '.connections.login_rate_per_s')/s"
    for rate in $SIO_CHAT_RATES; do
        for run in $(seq "$RUNS"); do
            wait_quiet
            "$peer" start >/dev/null
            echo "== socket.io chat $rate msg/s run $run (load $(load))"
            lt chat --target-kind socketio --targets "$("$peer" targets)" -n "$CHAT_USERS" \
                --rate "$rate" --duration "$CHAT_SECS" --cross-node-share 0.5 \
                --gateway-pid "$("$peer" pids)" --out "$OUT/sio-chat-$rate-$run.json"
            "$peer" stop
        done
        f=("$OUT"/sio-chat-$rate-*.json)
        echo "socket.io chat $rate medians: received/s $(median "${f[@]}" '.chat.throughput_per_s')," \
            "lost $(median "${f[@]}" '.chat.lost'), p50 $(median "${f[@]}" '.chat.latency.p50_ms') ms," \
            "p99 $(median "${f[@]}" '.chat.latency.p99_ms') ms," \
            "CPU/msg $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
    done
}

# Cross-node chat on local clusters (loadtest/bench/cluster.sh: Redis and MariaDB on this
# machine): 2 nodes, routed, every message to another node, at each of CLUSTER_RATES; then the
# routing modes with 2, 4 and 8 nodes at MATRIX_RATE; then 2 nodes with half of the messages
# crossing, at each of SIO_CHAT_RATES (the Socket.IO comparison's shape).
cluster() {
    local f
    for rate in ${CLUSTER_RATES:-5000 10000 20000 30000}; do
        for run in $(seq "$RUNS"); do
            wait_quiet
            echo "== cluster 2 routed $rate msg/s run $run (load $(load))"
            OUT=$OUT/cluster-2-routed-$rate-$run "$ROOT/loadtest/bench/cluster.sh" 2 routed "$rate" "$CHAT_SECS" | tail -1
        done
        f=("$OUT"/cluster-2-routed-$rate-*/chat-*.json)
        echo "cluster 2 routed $rate medians: received/s $(median "${f[@]}" '.chat.throughput_per_s')," \
            "lost $(median "${f[@]}" '.chat.lost'), p50 $(median "${f[@]}" '.chat.latency.p50_ms') ms," \
            "p99 $(median "${f[@]}" '.chat.latency.p99_ms') ms," \
            "gateway CPU/msg $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
    done
    for nodes in 2 4 8; do
        for mode in routed broadcast; do
            wait_quiet
            echo "== cluster $nodes $mode ${MATRIX_RATE:-5000} msg/s (load $(load))"
            OUT=$OUT/matrix-$nodes-$mode "$ROOT/loadtest/bench/cluster.sh" "$nodes" "$mode" "${MATRIX_RATE:-5000}" 5 |
                grep -E 'throughput|latency p50|system CPU|Redis:'
        done
    done
    for rate in $SIO_CHAT_RATES; do
        for run in $(seq "$RUNS"); do
            wait_quiet
            echo "== cluster 2 routed, half crossing, $rate msg/s run $run (load $(load))"
            SHARE=0.5 USERS=$CHAT_USERS OUT=$OUT/half-2-routed-$rate-$run \
                "$ROOT/loadtest/bench/cluster.sh" 2 routed "$rate" "$CHAT_SECS" | tail -1
        done
        f=("$OUT"/half-2-routed-$rate-*/chat-*.json)
        echo "cluster 2 routed half crossing $rate medians: received/s $(median "${f[@]}" '.chat.throughput_per_s')," \
            "lost $(median "${f[@]}" '.chat.lost'), p50 $(median "${f[@]}" '.chat.latency.p50_ms') ms," \
            "p99 $(median "${f[@]}" '.chat.latency.p99_ms') ms," \
            "gateway CPU/msg $(median "${f[@]}" '.system_cpu.per_unit_us') µs"
    done
}

case "${1:-all}" in
connect) connect ;;
chat) chat ;;
broadcast) broadcast ;;
socketio) socketio ;;
cluster) cluster ;;
all) connect; chat; broadcast; socketio; cluster ;;
*) echo "usage: $0 [all|connect|chat|broadcast|socketio|cluster]" >&2; exit 2 ;;
esac

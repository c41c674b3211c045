#!/usr/bin/env bash
# Starts or stops the Socket.IO peer: two Node.js processes sharing the local Redis.
#
#   loadtest/peers/socketio/run.sh start    # npm ci if needed, then one process per port in $PORTS
#   loadtest/peers/socketio/run.sh pids     # their process ids, comma-separated (for --gateway-pid)
#   loadtest/peers/socketio/run.sh targets  # their endpoints, comma-separated (for --targets)
#   loadtest/peers/socketio/run.sh stop
#
# Environment: PORTS (default "3101 3102"), REDIS_URL (default redis://127.0.0.1:6379).
set -euo pipefail
cd "$(dirname "$0")"
PORTS=${PORTS:-"3101 3102"}

case "${1:-start}" in
start)
    command -v node >/dev/null || { echo "node (>= 18) is required" >&2; exit 1; }
    [ -d node_modules ] || npm ci --no-audit --no-fund
    for port in $PORTS; do
        if [ -f "server-$port.pid" ] && kill -0 "$(cat "server-$port.pid")" 2>/dev/null; then
            echo "port $port: already running (pid $(cat "server-$port.pid"))"
            continue
        fi
        PORT=$port nohup node server.js >"server-$port.log" 2>&1 &
        echo $! >"server-$port.pid"
    done
    for port in $PORTS; do
        for _ in $(seq 150); do
            curl -fsS "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
            sleep 0.2
        done
        if ! curl -fsS "http://127.0.0.1:$port/healthz"; then
            echo "port $port did not start within 30 s:" >&2
            cat "server-$port.log" >&2
            "$0" stop
            exit 1
        fi
        echo
    done
    ;;
pids)
    pids=()
    for port in $PORTS; do pids+=("$(cat "server-$port.pid")"); done
    (IFS=,; echo "${pids[*]}")
    ;;
targets)
    targets=()
    for port in $PORTS; do targets+=("ws://127.0.0.1:$port"); done
    (IFS=,; echo "${targets[*]}")
    ;;
stop)
    for port in $PORTS; do
        if [ -f "server-$port.pid" ]; then
            kill "$(cat "server-$port.pid")" 2>/dev/null || true
            rm -f "server-$port.pid"
        fi
    done
    ;;
*)
    echo "usage: $0 start|pids|targets|stop" >&2
    exit 2
    ;;
esac

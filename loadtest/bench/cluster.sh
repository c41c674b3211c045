#!/usr/bin/env bash
# Cross-node chat on a cluster of N local gateway nodes (Redis at 127.0.0.1:6379 with a fresh key
# prefix, MariaDB at 127.0.0.1:3306 with a fresh database), in one routing mode, and the Redis work
# per message (commands and CPU from INFO deltas).
#
#   loadtest/bench/cluster.sh NODES MODE RATE [DURATION_S]
#   e.g. loadtest/bench/cluster.sh 2 routed 10000 10
#
# Or any other scenario on such a cluster (the targets, pids, admin URLs, secret and Redis are
# filled in; the rest of the arguments go to imgate-loadtest):
#   loadtest/bench/cluster.sh NODES MODE connect|broadcast [OPTIONS...]
#   e.g. loadtest/bench/cluster.sh 7 routed connect -n 105000 --procs 7 --rate 10000 --hold 20
#
# SHARE (default 1.0) is the share of messages to a user on another node; USERS (1000) the users.
# Needs: target/release/imgate and target/release/imgate-loadtest
#        (cargo build --release -p imgate -p imgate-loadtest), redis-cli, mariadb client.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

nodes=${1:?nodes}; mode=${2:?routed|broadcast}; rate=${3:?messages per second, or a scenario}
scenario=chat
case $rate in
    connect | broadcast) scenario=$rate; shift 3 ;;
    *) duration=${4:-10} ;;
esac
users=${USERS:-1000}
prefix="bench-$RANDOM$RANDOM"
db="imgate_bench_$RANDOM$RANDOM"
secret=bench-secret
out=${OUT:-/tmp/imgate-cluster-bench}
mkdir -p "$out"
mariadb -h127.0.0.1 -uroot -e "CREATE DATABASE $db CHARACTER SET utf8mb4"

pids=(); targets=(); admins=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    mariadb -h127.0.0.1 -uroot -e "DROP DATABASE IF EXISTS $db" || true
    redis-cli --scan --pattern "$prefix:*" | xargs -r redis-cli del >/dev/null || true
}
trap cleanup EXIT

for i in $(seq 1 "$nodes"); do
    cport=$((18000 + i * 10)); aport=$((cport + 1))
    IMGATE_AUTH__SECRET=$secret IMGATE_ADMIN__TOKEN=bench IMGATE_CLIENT__MAX_CONNECTIONS=200000 \
    IMGATE_CLUSTER__REDIS_URL=redis://127.0.0.1:6379 IMGATE_CLUSTER__KEY_PREFIX=$prefix \
    IMGATE_CLUSTER__ROUTING=$mode IMGATE_STORE__URL="mysql://root@127.0.0.1:3306/$db" \
    IMGATE_LOG__LEVEL=warn,fred=error \
        "${GATEWAY_BIN:-target/release/imgate}" --node-id "n$i" --client-listen "127.0.0.1:$cport" \
        --admin-listen "127.0.0.1:$aport" >"$out/node-$i.log" 2>&1 &
    pids+=($!); targets+=("tcp://127.0.0.1:$cport"); admins+=("http://127.0.0.1:$aport")
done
for a in "${admins[@]}"; do
    for _ in $(seq 1 600); do curl -sf "$a/readyz" >/dev/null && break; sleep 0.1; done
done

IFS=,; target_list="${targets[*]}"; pid_list="${pids[*]}"; admin_list="${admins[*]}"; unset IFS
if [[ $scenario != chat ]]; then
    target/release/imgate-loadtest "$scenario" --targets "$target_list" --secret $secret \
        --admin "$admin_list" --admin-token bench --gateway-pid "$pid_list" \
        --redis redis://127.0.0.1:6379 --out "$out/$scenario-$nodes-$mode.json" "$@" \
        | tee "$out/$scenario-$nodes-$mode.md"
    exit "${PIPESTATUS[0]}"
fi
# CPU ticks of the MariaDB server, to report its share per message.
mariadb_ticks() {
    local pid
    pid=$(pgrep -x mariadbd || pgrep -x mysqld || true)
    if [[ -n $pid ]]; then awk '{print $14 + $15}' "/proc/${pid%%$'\n'*}/stat"; else echo 0; fi
}
db_before=$(mariadb_ticks)
before=$(redis-cli info commandstats; redis-cli info cpu)
target/release/imgate-loadtest chat --targets "$target_list" --secret $secret -n "$users" \
    --rate "$rate" --duration "$duration" --payload 100 --cross-node-share "${SHARE:-1.0}" \
    --gateway-pid "$pid_list" --out "$out/chat-$nodes-$mode-$rate.json" ${CHAT_ARGS:-} | tee "$out/chat-$nodes-$mode-$rate.md"
after=$(redis-cli info commandstats; redis-cli info cpu)
db_after=$(mariadb_ticks)

python3 - "$out/chat-$nodes-$mode-$rate.json" <<PY | tee "$out/services-$nodes-$mode-$rate.txt"
import json, re, sys
def parse(text):
    calls, cpu = {}, 0.0
    for line in text.splitlines():
        m = re.match(r"cmdstat_(\w+):calls=(\d+)", line)
        if m: calls[m.group(1)] = int(m.group(2))
        m = re.match(r"used_cpu_(sys|user):([\d.]+)", line)
        if m: cpu += float(m.group(2))
    return calls, cpu
b_calls, b_cpu = parse("""$before""")
a_calls, a_cpu = parse("""$after""")
res = json.load(open(sys.argv[1]))
sent = None
def find(d, key):
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key and isinstance(v, (int, float)): return v
            r = find(v, key)
            if r is not None: return r
    return None
sent = find(res, "sent") or 1
delta = {k: a_calls.get(k, 0) - b_calls.get(k, 0) for k in a_calls}
top = sorted(((v, k) for k, v in delta.items() if v > 0), reverse=True)[:6]
print(f"Redis: {sum(delta.values())/sent:.2f} commands/message, "
      f"{(a_cpu-b_cpu)/sent*1e6:.1f} µs Redis CPU/message; top: " +
      ", ".join(f"{k}={v/sent:.2f}" for v, k in top))
ticks = $db_after - $db_before
hz = 100
print(f"MariaDB: {ticks / hz / sent * 1e6:.1f} µs of server CPU/message ({ticks / hz:.2f} s)")
PY

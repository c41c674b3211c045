#!/usr/bin/env bash
# Brings the real docker-compose.yml up, checks the three-node cluster end to end, and tears it
# down again (also on failure or Ctrl-C).
#
#   scripts/compose-test.sh
#
# Engine: Docker when `docker info` answers, otherwise Podman with podman-compose, following
# docs/podman.md (installs podman, podman-compose, runc and debootstrap when
# missing; builds a debian:bookworm base image with debootstrap; builds stand-ins for Redis,
# MariaDB and Prometheus from Debian's packages, because no image can be pulled there). Grafana
# is started and checked only when its image is available (always with Docker; with Podman only
# if GRAFANA_IMAGE names a local image) — Grafana is not packaged by Debian.
#
# Checks:
#   1. every node becomes ready (/readyz); the gateway runs as a non-root user; the schema
#      migrations ran exactly once although three nodes started together;
#   2. a client on node 1 (TCP) and one on node 3 (WebSocket) exchange messages, each receipt
#      "delivered"; a message sent through node 2's admin API reaches the user on node 1;
#      presence and history answer on node 2           (scripts/compose-check, the Rust client);
#   3. Prometheus scraped all three nodes (up{job="imgate"} == 1), the message counters reached
#      it, and every query of the Grafana dashboard is valid PromQL with data;
#   4. every message is a row in MariaDB with the right recipient and delivery state;
#   5. node 2 is stopped with SIGTERM while messages flow to and from its clients: the clients
#      are kicked "shutdown" and reconnect to node 1 or 3 (one from its endpoint list, one through
#      /api/v1/alloc); every "delivered" receipt arrived, every "stored" one is in the store,
#      messages sent after the reconnect arrive, the node exits 0 and leaves the registry;
#   6. node 2 starts again and rejoins (the second half of a rolling restart).
#
# Environment:
#   IMGATE_BUILD=host        (default) compile with `cargo build --release -p imgate` on this
#                            machine and copy the binary into the image (Dockerfile target
#                            `prebuilt`; the host's glibc must not be newer than Debian bookworm's)
#   IMGATE_BUILD=dockerfile  build the image from the Dockerfile, compiling inside the build
#                            (with Podman: RUST_IMAGE must name a local Rust image)
#   KEEP_CLUSTER=1           leave the cluster running at the end (tear down with
#                            `podman-compose -p imgate-compose-test down -v` / `docker compose ...`)
#   REMOVE_STANDINS=1        also remove the stand-in and base images at the end (Podman)
#   COMPOSE_TEST_PROJECT     compose project name (default imgate-compose-test)
#   REDIS_IMAGE, MARIADB_IMAGE, PROMETHEUS_IMAGE, GRAFANA_IMAGE   images to use instead
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

T_START=$(date +%s)
say() { printf '==> [%4ss] %s\n' "$(($(date +%s) - T_START))" "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
die() {
    printf '==> FAILED: %s\n' "$*" >&2
    exit 1
}

PROJECT=${COMPOSE_TEST_PROJECT:-imgate-compose-test}
IMGATE_BUILD=${IMGATE_BUILD:-host}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
WORK=$(mktemp -d /tmp/imgate-compose-test.XXXXXX)
# The gateway image this script builds, runs and removes (whatever IMGATE_IMAGE says outside).
export IMGATE_IMAGE=localhost/imgate:compose-test

# The development secrets of docker-compose.yml.
ADMIN_TOKEN=imgate-compose-dev-admin-token
DB_USER=imgate
DB_PASSWORD=imgate-dev-db-password
DB_NAME=imgate
# Host ports of docker-compose.yml.
NODE_CLIENT_PORTS=(7411 7421 7431)
NODE_ADMIN_PORTS=(7412 7422 7432)
PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
GRAFANA_PORT=${GRAFANA_PORT:-3000}
export PROMETHEUS_PORT GRAFANA_PORT BIND_ADDR=127.0.0.1 ADVERTISE_HOST=127.0.0.1

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- engine ---------------------------------------------------------------------------------

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

for tool in curl python3; do
    command -v "$tool" >/dev/null || apt_install "$tool"
done

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
    COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml)
else
    ENGINE=podman
    missing=()
    for pkg in podman podman-compose runc debootstrap; do
        command -v "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "no Docker engine; installing ${missing[*]}"
        apt_install "${missing[@]}"
    fi
    # crun (podman's default) fails on these machines (cgroups v1, rlimits); runc works.
    if [ ! -f /etc/containers/containers.conf ]; then
        as_root mkdir -p /etc/containers
        printf '[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n' |
            as_root tee /etc/containers/containers.conf >/dev/null
    fi
    COMPOSE=(podman-compose -p "$PROJECT" -f docker-compose.yml)
fi
say "engine: $ENGINE ($(${ENGINE} --version | head -n1)); project $PROJECT; work dir $WORK"

# Containers of the project, by service name (labels set by both docker compose and podman-compose).
container_of() {
    $ENGINE ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" --format '{{.Names}}' | head -n1
}
cexec() {
    local svc=$1
    shift
    $ENGINE exec "$(container_of "$svc")" "$@"
}
sql() {
    cexec mariadb mariadb -u"$DB_USER" -p"$DB_PASSWORD" -N -B "$DB_NAME" -e "$1"
}

# --- teardown -------------------------------------------------------------------------------

FAILED=1
cleanup() {
    local rc=$?
    set +e
    if [ "$FAILED" -ne 0 ] || [ "$rc" -ne 0 ]; then
        say "failure: container logs are in $WORK/logs; the last lines of each:"
        mkdir -p "$WORK/logs"
        for svc in redis mariadb imgate-1 imgate-2 imgate-3 prometheus grafana; do
            local c
            c=$(container_of "$svc")
            [ -n "$c" ] || continue
            $ENGINE logs "$c" >"$WORK/logs/$svc.log" 2>&1
            echo "---- $svc ----"
            tail -n 15 "$WORK/logs/$svc.log"
        done
    fi
    if [ "$KEEP_CLUSTER" = 1 ]; then
        say "KEEP_CLUSTER=1: the cluster keeps running; stop it with: ${COMPOSE[*]} down -v"
    else
        say "tearing down"
        "${COMPOSE[@]}" down -v -t 5 >"$WORK/down.log" 2>&1 ||
            { echo "compose down failed:"; tail -n 20 "$WORK/down.log"; }
        # podman-compose 1.0.3 leaves the project network behind.
        [ "$ENGINE" = podman ] && podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
        $ENGINE rmi "$IMGATE_IMAGE" >/dev/null 2>&1
        if [ "${REMOVE_STANDINS:-0}" = 1 ] && [ "$ENGINE" = podman ]; then
            podman rmi "${STANDINS[@]}" localhost/debian:bookworm >/dev/null 2>&1
        fi
    fi
    if [ "$FAILED" -eq 0 ] && [ "$rc" -eq 0 ]; then
        rm -rf "$WORK"
        say "PASSED in $(($(date +%s) - T_START)) s"
    else
        say "FAILED after $(($(date +%s) - T_START)) s (logs kept in $WORK)"
    fi
    exit "$rc"
}
STANDINS=()
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- images ---------------------------------------------------------------------------------

for port in "${NODE_CLIENT_PORTS[@]}" "${NODE_ADMIN_PORTS[@]}" "$PROMETHEUS_PORT" "$GRAFANA_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port on 127.0.0.1 is in use (another cluster still up? ${COMPOSE[*]} down -v)"
    fi
done
# A leftover of an interrupted run.
"${COMPOSE[@]}" down -v -t 5 >/dev/null 2>&1 || true

GRAFANA=0
if [ "$ENGINE" = docker ]; then
    GRAFANA=1
else
    BASE=localhost/debian:bookworm
    if ! podman image exists "$BASE"; then
        say "building the base image $BASE with debootstrap (once; about a minute)"
        rootfs="$WORK/rootfs"
        as_root debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
            { tail -n 20 "$WORK/debootstrap.log"; die "debootstrap failed"; }
        as_root tar -C "$rootfs" -c . | podman import - "$BASE" >/dev/null
        as_root rm -rf "$rootfs"
    fi

    # Stand-ins built from Debian's packages, unless the caller named other images. The tag
    # carries a hash of the build files, so a changed recipe builds a new image.
    standin() { # name; the Containerfile on stdin (and $WORK/standin-<name>/entrypoint.sh)
        local name=$1 dir="$WORK/standin-$1" hash
        mkdir -p "$dir"
        cat >"$dir/Containerfile"
        [ -f "$dir/entrypoint.sh" ] || : >"$dir/entrypoint.sh"
        hash=$(cat "$dir/Containerfile" "$dir/entrypoint.sh" | sha256sum | cut -c1-12)
        STANDIN="localhost/imgate-standin-$name:$hash"
        if ! podman image exists "$STANDIN"; then
            say "building stand-in $STANDIN from Debian packages (once)"
            nice podman build -t "$STANDIN" "$dir" >"$dir/build.log" 2>&1 ||
                { tail -n 30 "$dir/build.log"; die "building $STANDIN failed"; }
        fi
        STANDINS+=("$STANDIN")
    }
    if [ -z "${REDIS_IMAGE:-}" ]; then
        standin redis <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \\
 && rm -rf /var/lib/apt/lists/*
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
        REDIS_IMAGE=$STANDIN
    fi
    if [ -z "${MARIADB_IMAGE:-}" ]; then
        # Mimics the official image: initialises the data directory on first start, creating
        # MARIADB_DATABASE and MARIADB_USER/MARIADB_PASSWORD, root with MARIADB_ROOT_PASSWORD.
        mkdir -p "$WORK/standin-mariadb"
        cat >"$WORK/standin-mariadb/entrypoint.sh" <<'EOF'
#!/bin/sh
set -eu
datadir=/var/lib/mysql
if [ ! -d "$datadir/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$datadir" --skip-test-db >/dev/null
    mariadbd --user=mysql --datadir="$datadir" --skip-networking --socket=/tmp/init.sock &
    pid=$!
    i=0
    until mariadb-admin --socket=/tmp/init.sock ping >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -lt 120 ] || { echo "mariadbd did not start" >&2; exit 1; }
        sleep 0.5
    done
    mariadb --socket=/tmp/init.sock -uroot <<SQL
ALTER USER 'root'@'localhost' IDENTIFIED BY '${MARIADB_ROOT_PASSWORD}';
CREATE DATABASE IF NOT EXISTS \`${MARIADB_DATABASE}\`;
CREATE USER '${MARIADB_USER}'@'%' IDENTIFIED BY '${MARIADB_PASSWORD}';
GRANT ALL ON \`${MARIADB_DATABASE}\`.* TO '${MARIADB_USER}'@'%';
FLUSH PRIVILEGES;
SQL
    kill "$pid"
    wait "$pid" || true
    echo "stand-in: initialised $datadir"
fi
# Like the official image (its docker.cnf): no reverse DNS lookups of clients. Without this every
# new client address (a restarted node) waits for the resolver, 5 s or more per connection.
exec mariadbd --user=mysql --datadir="$datadir" --bind-address=0.0.0.0 --port=3306 \
    --skip-name-resolve --host-cache-size=0 "$@"
EOF
        standin mariadb <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mariadb-server mariadb-client \\
 && rm -rf /var/lib/apt/lists/* /var/lib/mysql && mkdir -p /var/lib/mysql /run/mysqld \\
 && chown mysql:mysql /var/lib/mysql /run/mysqld
COPY entrypoint.sh /usr/local/bin/entrypoint.sh
RUN chmod 0755 /usr/local/bin/entrypoint.sh
EXPOSE 3306
ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]
EOF
        MARIADB_IMAGE=$STANDIN
    fi
    if [ -z "${PROMETHEUS_IMAGE:-}" ]; then
        standin prometheus <<EOF
FROM $BASE
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \\
 && rm -rf /var/lib/apt/lists/* && mkdir -p /prometheus && chown nobody:nogroup /prometheus
USER nobody
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
        PROMETHEUS_IMAGE=$STANDIN
    fi
    if [ -n "${GRAFANA_IMAGE:-}" ] && podman image exists "$GRAFANA_IMAGE"; then
        GRAFANA=1
    fi
    export REDIS_IMAGE MARIADB_IMAGE PROMETHEUS_IMAGE
fi

# The gateway image.
case "$IMGATE_BUILD" in
host)
    glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
    glibc=${glibc:-unknown}
    if [ "$glibc" = unknown ] || [ "$(printf '%s\n2.36\n' "$glibc" | sort -V | tail -n1)" != 2.36 ]; then
        die "this machine's glibc ($glibc) is newer than Debian bookworm's (2.36): a binary built here may not run in the image; use IMGATE_BUILD=dockerfile"
    fi
    say "cargo build --release -p imgate (host build, copied into the image: Dockerfile target prebuilt)"
    nice cargo build --release --locked -p imgate >"$WORK/cargo-build.log" 2>&1 ||
        { tail -n 40 "$WORK/cargo-build.log"; die "cargo build --release -p imgate failed"; }
    mkdir -p "$WORK/ctx"
    cp target/release/imgate "$WORK/ctx/imgate"
    # The release profile keeps line tables (debug = 1): drop them, keep the symbols.
    command -v strip >/dev/null && strip --strip-debug "$WORK/ctx/imgate"
    build_args=(--target prebuilt -f "$ROOT/Dockerfile" -t "$IMGATE_IMAGE")
    [ "$ENGINE" = podman ] && build_args+=(--build-arg "RUNTIME_IMAGE=$BASE")
    nice $ENGINE build -q "${build_args[@]}" "$WORK/ctx" >"$WORK/image-build.log" 2>&1 ||
        { tail -n 30 "$WORK/image-build.log"; die "building $IMGATE_IMAGE failed"; }
    ;;
dockerfile)
    say "building $IMGATE_IMAGE from the Dockerfile (compiles inside the build)"
    build_args=(-f Dockerfile -t "$IMGATE_IMAGE")
    if [ "$ENGINE" = podman ]; then
        [ -n "${RUST_IMAGE:-}" ] || die "IMGATE_BUILD=dockerfile with Podman needs RUST_IMAGE (a local Rust image on bookworm)"
        build_args+=(--build-arg "RUNTIME_IMAGE=$BASE" --build-arg "RUST_IMAGE=$RUST_IMAGE")
    fi
    nice $ENGINE build "${build_args[@]}" . >"$WORK/image-build.log" 2>&1 ||
        { tail -n 30 "$WORK/image-build.log"; die "building $IMGATE_IMAGE failed"; }
    ;;
*) die "IMGATE_BUILD must be host or dockerfile, not $IMGATE_BUILD" ;;
esac
ok "gateway image $IMGATE_IMAGE ($($ENGINE image inspect -f '{{.Size}}' "$IMGATE_IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

say "building the checker (scripts/compose-check, the shipped Rust client)"
[ -f scripts/compose-check/Cargo.lock ] || cp Cargo.lock scripts/compose-check/Cargo.lock
CHECK_TARGET="$ROOT/target/compose-check"
# A debug build: it compiles faster than release, and speed does not matter here.
CARGO_TARGET_DIR="$CHECK_TARGET" nice cargo build -q --offline \
    --manifest-path scripts/compose-check/Cargo.toml >"$WORK/check-build.log" 2>&1 ||
    CARGO_TARGET_DIR="$CHECK_TARGET" nice cargo build -q \
        --manifest-path scripts/compose-check/Cargo.toml >"$WORK/check-build.log" 2>&1 ||
    { tail -n 40 "$WORK/check-build.log"; die "building scripts/compose-check failed"; }
CHECK_BIN="$CHECK_TARGET/debug/imgate-compose-check"
# Every check is bounded: a hung check fails the run instead of holding it.
CHECK() { timeout -k 10 300 "$CHECK_BIN" "$@" || die "a compose check failed (exit $?; 124 = it ran past 300 s)"; }

# --- up -------------------------------------------------------------------------------------

SERVICES=(redis mariadb imgate-1 imgate-2 imgate-3 prometheus)
if [ "$GRAFANA" = 1 ]; then
    SERVICES+=(grafana)
else
    say "Grafana is not started: no Grafana image can be pulled or built here (Debian does not package it); its dashboard's queries are checked against Prometheus instead"
fi
say "compose up: ${SERVICES[*]}"
T_UP=$(date +%s)
"${COMPOSE[@]}" up -d --no-build "${SERVICES[@]}" >"$WORK/up.log" 2>&1 ||
    { tail -n 30 "$WORK/up.log"; die "compose up failed"; }

wait_http() { # url, seconds
    local i
    for ((i = 0; i < $2 * 2; i++)); do
        curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null && return 0
        sleep 0.5
    done
    return 1
}
for i in 0 1 2; do
    wait_http "http://127.0.0.1:${NODE_ADMIN_PORTS[$i]}/readyz" 240 ||
        die "node-$((i + 1)) did not become ready within 240 s"
done
ok "the three nodes are ready $(($(date +%s) - T_UP)) s after compose up"
wait_http "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 60 || die "Prometheus did not become ready"

user=$(cexec imgate-1 id -u)
[ "$user" != 0 ] || die "the gateway runs as root"
ok "the gateway runs as uid $user"
nodes=$(curl -fsS -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:7412/api/v1/nodes" |
    python3 -c 'import json,sys; print(" ".join(sorted(n["id"]+"@"+n["client_addr"] for n in json.load(sys.stdin)["nodes"])))')
[ "$nodes" = "node-1@127.0.0.1:7411 node-2@127.0.0.1:7421 node-3@127.0.0.1:7431" ] ||
    die "node registry: $nodes"
ok "node registry: $nodes (the host-published addresses)"
applied=$(sql "SELECT COUNT(*) FROM _sqlx_migrations")
files=$(find migrations/mysql -name '*.sql' | wc -l)
[ "$applied" = "$files" ] || die "_sqlx_migrations has $applied rows, migrations/mysql has $files files"
ok "the $files migration(s) applied once ($applied row(s) in _sqlx_migrations)"

# --- clients --------------------------------------------------------------------------------

PREFIX="ct$(date +%s)"
: >"$WORK/tokens"
for u in alice bob carol erin; do
    echo "$PREFIX-$u $(cexec imgate-1 imgate token --user "$PREFIX-$u" --ttl-secs 3600)" >>"$WORK/tokens"
done
ok "login tokens minted with \`imgate token\` inside node-1 (the compose's development secret)"
CHECK_ARGS=(
    --node "node-1=127.0.0.1:7411=http://127.0.0.1:7412"
    --node "node-2=127.0.0.1:7421=http://127.0.0.1:7422"
    --node "node-3=127.0.0.1:7431=http://127.0.0.1:7432"
    --admin-token "$ADMIN_TOKEN" --tokens "$WORK/tokens" --prefix "$PREFIX"
)

say "check: node 1 <-> node 3, and node 2's admin API -> node 1"
CHECK "${CHECK_ARGS[@]}" --ids-out "$WORK/ids-exchange" exchange

# --- Prometheus -----------------------------------------------------------------------------

prom() { # PromQL -> JSON result array
    curl -fsS --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query" --data-urlencode "query=$1" |
        python3 -c 'import json,sys; r=json.load(sys.stdin); assert r["status"]=="success", r; print(json.dumps(r["data"]["result"]))'
}
say "check: Prometheus"
for ((i = 0; ; i++)); do
    up=$(prom 'up{job="imgate"} == 1' | python3 -c 'import json,sys; print(" ".join(sorted(r["metric"]["node"] for r in json.load(sys.stdin))))')
    [ "$up" = "node-1 node-2 node-3" ] && break
    [ "$i" -lt 60 ] || die "Prometheus: up{job=\"imgate\"} == 1 for [$up], expected all three nodes"
    sleep 1
done
ok "Prometheus scrapes all three nodes: up{job=\"imgate\"} == 1 for $up"
for ((i = 0; ; i++)); do
    delivered=$(prom 'sum(imgate_messages_total{job="imgate",outcome="delivered"})' |
        python3 -c 'import json,sys; r=json.load(sys.stdin); print(int(float(r[0]["value"][1])) if r else 0)')
    [ "$delivered" -ge 7 ] && break
    [ "$i" -lt 30 ] || die "Prometheus: sum(imgate_messages_total{outcome=\"delivered\"}) = $delivered, expected >= 7"
    sleep 1
done
ok "Prometheus has the message counters: $delivered delivered"
if [ "$GRAFANA" = 1 ]; then
    say "check: Grafana"
    wait_http "http://127.0.0.1:$GRAFANA_PORT/api/health" 120 || die "Grafana did not become healthy"
    g() { curl -fsS -u admin:imgate-dev-grafana-password "http://127.0.0.1:$GRAFANA_PORT$1"; }
    g /api/datasources/uid/prometheus >/dev/null || die "Grafana: no provisioned Prometheus data source"
    g /api/dashboards/uid/imgate-cluster >/dev/null || die "Grafana: no provisioned imgate dashboard"
    g /api/datasources/uid/prometheus/health >/dev/null || die "Grafana cannot query Prometheus"
    ok "Grafana is up with the provisioned data source and the \"imgate cluster\" dashboard"
fi

# --- MySQL ----------------------------------------------------------------------------------

check_rows() { # ids file: "id recipient status"
    local file=$1 ids n
    ids=$(awk '{print $1}' "$file" | paste -sd, -)
    n=$(wc -l <"$file")
    sql "SELECT id, CAST(recipient AS CHAR), state FROM messages WHERE id IN ($ids)" >"$file.rows"
    python3 - "$file" "$file.rows" <<'EOF' || die "MariaDB rows do not match the receipts"
import sys
rows = {}
for line in open(sys.argv[2]):
    i, rcpt, state = line.rstrip("\n").split("\t")
    rows[i] = (rcpt, int(state))
bad, states = [], {}
for line in open(sys.argv[1]):
    i, rcpt, status = line.split()
    if i not in rows:
        bad.append(f"message {i} to {rcpt} ({status}) is not in the messages table")
        continue
    r, s = rows[i]
    states[(status, s)] = states.get((status, s), 0) + 1
    if r != rcpt:
        bad.append(f"message {i}: recipient {r}, expected {rcpt}")
    if status == "delivered" and s < 1:
        bad.append(f"message {i}: receipt delivered, stored state {s} (pending)")
    # A stored message is pending until a reconnecting device has it replayed and acknowledges
    # it; then it is acknowledged (2). Only "delivered" (1) would be wrong for it.
    if status == "stored" and s == 1:
        bad.append(f"message {i}: receipt stored, stored state {s} (delivered)")
names = {0: "pending", 1: "delivered", 2: "acknowledged"}
print("    rows by receipt -> state:", ", ".join(f"{k[0]} -> {names[k[1]]}: {v}" for k, v in sorted(states.items())))
for b in bad:
    print("    FAIL:", b)
sys.exit(1 if bad else 0)
EOF
    ok "all $n messages are rows in MariaDB with the right recipient and state"
}
say "check: the messages are in MariaDB"
sleep 1 # acks are written asynchronously; the states only rise, so this only changes the counts
check_rows "$WORK/ids-exchange"

# --- rolling restart ------------------------------------------------------------------------

say "check: stopping node-2 (SIGTERM) while its clients send and receive"
printf -v STOP_CMD '%q ' "${COMPOSE[@]}" stop -t 45 imgate-2
CHECK "${CHECK_ARGS[@]}" --ids-out "$WORK/ids-failover" failover --stop-cmd "$STOP_CMD >$WORK/stop.log 2>&1"
c2=$(container_of imgate-2)
code=$($ENGINE inspect -f '{{.State.ExitCode}}' "$c2")
$ENGINE logs "$c2" >"$WORK/node-2.log" 2>&1
[ "$code" = 0 ] || die "node-2 exited with $code (137 = killed after the stop timeout)"
grep -q "left the cluster" "$WORK/node-2.log" || die "node-2 did not log \"left the cluster\""
if grep -q "grace period over" "$WORK/node-2.log"; then die "node-2's connections outlived the grace period"; fi
ok "node-2 exited 0 after draining, leaving the cluster and closing its store; its log:"
sed 's/\x1b\[[0-9;]*m//g' "$WORK/node-2.log" |
    grep -E 'SIGTERM|shutting down|left the cluster|store|stopped' | tail -n 8 | cut -c1-160 | sed 's/^/      /'
check_rows "$WORK/ids-failover"

say "check: the Grafana dashboard's queries against Prometheus"
python3 - "$ROOT/deploy/grafana/dashboards/imgate.json" >"$WORK/dashboard-queries" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
def walk(panels):
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))
for p in walk(d["panels"]):
    for t in p.get("targets", []):
        q = t["expr"].replace("$node", ".*").replace("$__rate_interval", "1m")
        print(p["title"] + "\t" + q)
EOF
nq=0
empty=()
while IFS=$'\t' read -r title q; do
    res=$(prom "$q") || die "dashboard panel \"$title\": Prometheus refused: $q"
    nq=$((nq + 1))
    if [ "$res" = "[]" ] && [[ " ${empty[*]:-} " != *" \"$title\" "* ]]; then empty+=("\"$title\""); fi
done <"$WORK/dashboard-queries"
ok "all $nq queries of the Grafana dashboard are valid PromQL"
echo "      panels with a query that has no data yet (nothing of that kind happened): ${empty[*]:-none}"

say "check: node-2 starts again and rejoins"
T_RESTART=$(date +%s)
"${COMPOSE[@]}" start imgate-2 >"$WORK/start.log" 2>&1 || { cat "$WORK/start.log"; die "compose start imgate-2 failed"; }
wait_http "http://127.0.0.1:7422/readyz" 120 || die "node-2 did not become ready again"
ok "node-2 ready $(($(date +%s) - T_RESTART)) s after the start command"
for ((i = 0; ; i++)); do
    n=$(curl -fsS -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:7412/api/v1/nodes" |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["nodes"]))')
    [ "$n" = 3 ] && break
    [ "$i" -lt 30 ] || die "after the restart node-1 sees $n nodes"
    sleep 1
done
ok "node-2 is ready again and the registry lists 3 nodes"

FAILED=0

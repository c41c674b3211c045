#!/usr/bin/env bash
# Runs the whole imgate test suite on a fresh Debian/Ubuntu machine, installing and starting what
# it needs: a Rust toolchain check, cargo-nextest (falls back to `cargo test`), Redis and MariaDB.
#
#   scripts/test.sh                    # everything
#   scripts/test.sh -E 'test(login)'   # extra arguments go to `cargo nextest run` (or `cargo test`)
#
# Environment:
#   TEST_REDIS_URL          Redis the tests use        (default redis://127.0.0.1:6379)
#   TEST_MYSQL_URL          MariaDB/MySQL server URL   (default mysql://root@127.0.0.1:3306)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '==> %s\n' "$*"; }
die() {
    printf '==> ERROR: %s\n' "$*" >&2
    exit 1
}

export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export TEST_MYSQL_URL="${TEST_MYSQL_URL:-mysql://root@127.0.0.1:3306}"

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' and sudo is not installed"
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "cannot install $* automatically (no apt-get); install it yourself and re-run"
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# Polls `check` (a function name) every half second for up to `secs` seconds.
wait_for() {
    local check=$1 secs=$2 i
    for ((i = 0; i < secs * 2; i++)); do
        if "$check"; then return 0; fi
        sleep 0.5
    done
    "$check"
}

# --- Rust -----------------------------------------------------------------------------------------

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null 2>&1; then
    cat >&2 <<'EOF'
==> ERROR: no Rust toolchain (cargo) found.
    Install one with rustup (https://rustup.rs):
        curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh
    then open a new shell (or `source "$HOME/.cargo/env"`) and run scripts/test.sh again.
EOF
    exit 1
fi
say "Rust: $(cargo --version)"

RUNNER=nextest
if cargo nextest --version >/dev/null 2>&1; then
    say "cargo-nextest: $(cargo nextest --version 2>/dev/null | head -n1)"
else
    say "cargo-nextest missing: cargo install cargo-nextest --locked"
    if cargo install cargo-nextest --locked && cargo nextest --version >/dev/null 2>&1; then
        say "cargo-nextest installed"
    else
        say "could not install cargo-nextest; falling back to cargo test"
        RUNNER=cargo-test
    fi
fi

# --- Redis ----------------------------------------------------------------------------------------

is_local_host() { case "$1" in 127.0.0.1 | localhost | ::1 | '[::1]') return 0 ;; *) return 1 ;; esac; }

# Host from TEST_REDIS_URL (redis://[user:password@]host[:port][/db]).
redis_hostport=${TEST_REDIS_URL#*://}
redis_hostport=${redis_hostport#*@}
redis_hostport=${redis_hostport%%/*}
REDIS_HOST=${redis_hostport%:*}
if [ -z "$REDIS_HOST" ]; then REDIS_HOST=127.0.0.1; fi

redis_ok() { redis-cli -u "$TEST_REDIS_URL" ping 2>/dev/null | grep -q PONG; }

if command -v redis-cli >/dev/null 2>&1 && redis_ok; then
    say "Redis: reachable at $TEST_REDIS_URL"
else
    is_local_host "$REDIS_HOST" ||
        die "Redis at $TEST_REDIS_URL does not answer PING, and it is not local, so it cannot be started here"
    if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then
        apt_install redis-server
    fi
    if redis_ok; then
        say "Redis: reachable at $TEST_REDIS_URL (started by its package)"
    else
        REDIS_LOG=/tmp/imgate-redis.log
        if [ -e "$REDIS_LOG" ] && [ ! -w "$REDIS_LOG" ]; then
            REDIS_LOG=/tmp/imgate-redis-$(id -u).log
        fi
        say "starting redis-server on 127.0.0.1:6379 (log: $REDIS_LOG)"
        # Runs as the current user, without persistence, in a directory everyone can write.
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
            --dir /tmp --logfile "$REDIS_LOG" ||
            die "redis-server did not start; see $REDIS_LOG"
        wait_for redis_ok 20 ||
            die "Redis does not answer at $TEST_REDIS_URL after 20 s; see $REDIS_LOG"
        say "Redis: up at $TEST_REDIS_URL"
    fi
fi

# --- MariaDB / MySQL ------------------------------------------------------------------------------

# User, password, host and port from TEST_MYSQL_URL (mysql://user[:password]@host[:port][/db]).
mysql_rest=${TEST_MYSQL_URL#*://}
mysql_auth=root
if [[ $mysql_rest == *@* ]]; then
    mysql_auth=${mysql_rest%%@*}
    mysql_rest=${mysql_rest#*@}
fi
mysql_hostport=${mysql_rest%%/*}
MYSQL_USER=${mysql_auth%%:*}
MYSQL_PASSWORD=
if [[ $mysql_auth == *:* ]]; then MYSQL_PASSWORD=${mysql_auth#*:}; fi
MYSQL_HOST=${mysql_hostport%%:*}
MYSQL_PORT=3306
if [[ $mysql_hostport == *:* ]]; then MYSQL_PORT=${mysql_hostport##*:}; fi
if [ "$MYSQL_HOST" = localhost ]; then MYSQL_HOST=127.0.0.1; fi

have_mysql_client() { command -v mariadb >/dev/null 2>&1 || command -v mysql >/dev/null 2>&1; }
mysql_ok() {
    local client=mariadb
    command -v mariadb >/dev/null 2>&1 || client=mysql
    MYSQL_PWD="$MYSQL_PASSWORD" "$client" --protocol=TCP -h"$MYSQL_HOST" -P"$MYSQL_PORT" \
        -u"$MYSQL_USER" -e 'select 1' >/dev/null 2>&1
}
# Whether anything accepts TCP connections on the MySQL port (a login may still be refused).
mysql_listening() { (exec 3<>"/dev/tcp/$MYSQL_HOST/$MYSQL_PORT") 2>/dev/null; }
mysql_daemon() {
    local d
    for d in /usr/sbin/mariadbd /usr/sbin/mysqld; do
        if [ -x "$d" ]; then
            echo "$d"
            return 0
        fi
    done
    return 1
}

if have_mysql_client && mysql_ok; then
    say "MariaDB/MySQL: reachable at $MYSQL_HOST:$MYSQL_PORT as $MYSQL_USER"
else
    packages=()
    if ! mysql_listening; then
        is_local_host "$MYSQL_HOST" ||
            die "nothing listens at $MYSQL_HOST:$MYSQL_PORT ($TEST_MYSQL_URL), and it is not local, so it cannot be started here"
        mysql_daemon >/dev/null || packages+=(mariadb-server)
    fi
    have_mysql_client || packages+=(mariadb-client)
    if [ "${#packages[@]}" -gt 0 ]; then apt_install "${packages[@]}"; fi

    if ! mysql_listening; then
        daemon=$(mysql_daemon) || die "no mariadbd or mysqld found after installing mariadb-server"
        say "starting MariaDB ($daemon)"
        as_root mkdir -p /run/mysqld
        as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
        if ! as_root start-stop-daemon --start --oknodo --background --exec "$daemon" -- --user=mysql; then
            say "start-stop-daemon failed; trying: service mariadb start"
            as_root service mariadb start || as_root service mysql start ||
                die "could not start MariaDB"
        fi
        wait_for mysql_listening 60 ||
            die "MariaDB does not listen on $MYSQL_HOST:$MYSQL_PORT after 60 s (see /var/log/mysql/ or the journal)"
    fi
    if ! wait_for mysql_ok 10; then
        cat >&2 <<EOF
==> ERROR: MariaDB/MySQL listens on $MYSQL_HOST:$MYSQL_PORT, but '$MYSQL_USER' cannot log in over TCP
    with the password in TEST_MYSQL_URL ($TEST_MYSQL_URL).
    Debian and Ubuntu let root log in to MariaDB only through the unix socket. On a machine used only
    for tests, let root in over TCP with an empty password:
        sudo mariadb -e "ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket OR mysql_native_password USING PASSWORD(''); CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''; GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION; FLUSH PRIVILEGES;"
    or point the tests at an account that may create databases:
        TEST_MYSQL_URL=mysql://user:password@127.0.0.1:3306 scripts/test.sh
EOF
        exit 1
    fi
    say "MariaDB/MySQL: up at $MYSQL_HOST:$MYSQL_PORT"
fi

# --- Tests ----------------------------------------------------------------------------------------

say "TEST_REDIS_URL=$TEST_REDIS_URL TEST_MYSQL_URL=$TEST_MYSQL_URL"
if [ "$RUNNER" = nextest ]; then
    say "cargo nextest run --workspace --no-fail-fast $*"
    exec cargo nextest run --workspace --no-fail-fast "$@"
else
    say "cargo test --workspace --no-fail-fast $*"
    exec cargo test --workspace --no-fail-fast "$@"
fi

#!/usr/bin/env bash
# A private PostgreSQL 15 cluster for the store tests: its own data directory, a unix socket
# under /tmp and 127.0.0.1 on a free port; never the system's cluster.
#
#   scripts/postgres-test-server.sh start DIR   prints the database URL on stdout
#   scripts/postgres-test-server.sh stop DIR    stops it and removes DIR
#
# Runs initdb/pg_ctl as the postgres user when started as root (PostgreSQL refuses root), so
# the parents of DIR must be traversable by that user.
# Every wait is bounded (pg_ctl -t).
set -euo pipefail

PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
action=${1:?usage: $0 start|stop DIR}
dir=${2:?usage: $0 start|stop DIR}
DB=vmferry_test

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$action" in
start)
    [ -x "$PGBIN/initdb" ] || { echo "no PostgreSQL 15 at $PGBIN (apt-get install postgresql)" >&2; exit 3; }
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres: "$dir"; fi
    chmod 700 "$dir"
    port=$(free_port)
    as_owner "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-k $dir -p $port -h 127.0.0.1 -F -c fsync=off -c full_page_writes=off" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    echo "$port" >"$dir/port"
    as_owner "$PGBIN/createdb" -h "$dir" -p "$port" -U postgres "$DB"
    echo "postgresql+psycopg://postgres@127.0.0.1:$port/$DB"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_owner "$PGBIN/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac

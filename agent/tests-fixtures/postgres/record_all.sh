#!/usr/bin/env bash
# Re-records every fixture in this folder against a PostgreSQL 15 server.
#
#   record_all.sh SERVER_PORT
#
# The server must listen on 127.0.0.1:SERVER_PORT with trust auth for user postgres and ssl=off,
# and have the pgbench tables (pgbench -i -s 1 -h 127.0.0.1 -p SERVER_PORT -U postgres postgres).
# Needs psql, pgbench, python3 with psycopg 3 and asyncpg.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
server_port="$1"
proxy_port=$((server_port + 1))
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

record() { # NAME COMMENT -- COMMAND...
    local name="$1" comment="$2"
    shift 3
    python3 "$here/record_proxy.py" --listen "$proxy_port" --upstream "127.0.0.1:$server_port" \
        --out "$tmp/$name" --comment "$comment" &
    local proxy=$!
    sleep 0.5
    "$@" || true
    sleep 0.5
    kill "$proxy"
    wait "$proxy" 2>/dev/null || true
    for f in "$tmp/$name"-*.hex; do cp "$f" "$here/"; done
}

conn="host=127.0.0.1 port=$proxy_port user=postgres dbname=postgres"

record psql_simple "psql 15, sslmode=disable, script on stdin (record_all.sh)" -- \
    psql -X -q "$conn sslmode=disable application_name=fixture" -f "$here/psql_simple.sql"

record psql_ssl_prefer "psql 15, sslmode=prefer against a server with ssl=off: SSLRequest answered N" -- \
    psql -X -q "$conn sslmode=prefer" -c "SELECT current_user"

record pgbench_extended "pgbench -M extended -c 1 -t 2 (sslmode=disable)" -- \
    env PGSSLMODE=disable pgbench -M extended -c 1 -t 2 -h 127.0.0.1 -p "$proxy_port" -U postgres postgres

record pgbench_prepared "pgbench -M prepared -c 1 -t 2 (sslmode=disable)" -- \
    env PGSSLMODE=disable pgbench -M prepared -c 1 -t 2 -h 127.0.0.1 -p "$proxy_port" -U postgres postgres

record psycopg "psycopg 3: prepared statement x4, pipeline, failing pipeline, COPY, CopyFail (record_clients.py)" -- \
    python3 "$here/record_clients.py" psycopg "$proxy_port"

record asyncpg "asyncpg: cursor with prefetch=3 inside a transaction => Execute row limit / PortalSuspended" -- \
    python3 "$here/record_clients.py" asyncpg "$proxy_port"

#!/usr/bin/env bash
# THE test command: installs what a fresh machine lacks, then lint + the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# Dovecot is the real IMAP server the integration tests start on loopback.
if ! command -v dovecot >/dev/null 2>&1; then
    echo "installing dovecot-imapd (the tests' IMAP server)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq dovecot-imapd >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy bridge

# PostgreSQL: the store and some integration tests run on it too (tests/conftest.py reads
# MAILBRIDGE_TEST_POSTGRES). A server at 127.0.0.1:5432 that lets `postgres` in is used as it is;
# else a throwaway cluster of our own: trust auth, loopback, a free port, removed at exit.
pg_reachable() {
    .venv/bin/python - "$1" <<'PY'
import sys

import psycopg

try:
    psycopg.connect(sys.argv[1], connect_timeout=3).close()
except psycopg.Error:
    sys.exit(1)
PY
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

# initdb refuses to run as root: root runs the cluster as the `postgres` user.
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

PG_DIR=""
stop_postgres() {
    if [ -n "$PG_DIR" ]; then
        as_postgres "$(pg_bin)/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
        rm -rf "$PG_DIR"
    fi
}

install_postgres() {
    if [ -z "$(pg_bin)" ]; then
        echo "installing postgresql (the tests' second database)"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
    fi
}

start_postgres() {
    local bin port
    bin=$(pg_bin)
    port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    PG_DIR=$(mktemp -d /tmp/mailbridge-pg.XXXXXX)
    trap stop_postgres EXIT
    if [ "$(id -u)" -eq 0 ]; then chown postgres: "$PG_DIR"; fi
    echo "starting a throwaway PostgreSQL on 127.0.0.1:$port ($PG_DIR)"
    as_postgres "$bin/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --no-locale \
        >"$PG_DIR/initdb.log"
    # -F: no fsync (a test database need not survive a power cut); -w: wait until it accepts.
    as_postgres "$bin/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
        -o "-h 127.0.0.1 -p $port -k $PG_DIR -F" start >/dev/null
    export MAILBRIDGE_TEST_POSTGRES="postgresql://postgres@127.0.0.1:$port/postgres"
}

# The server binaries are needed even when a server runs: the chaos test of several instances
# (tests/servers/postgres.py) restarts a throwaway cluster of its own under load.
install_postgres
if [ -z "${MAILBRIDGE_TEST_POSTGRES:-}" ]; then
    if pg_reachable "postgresql://postgres@127.0.0.1:5432/postgres"; then
        export MAILBRIDGE_TEST_POSTGRES="postgresql://postgres@127.0.0.1:5432/postgres"
    else
        start_postgres
    fi
fi

# Not exec: the trap stops our PostgreSQL when the tests end.
.venv/bin/python -m pytest "$@"

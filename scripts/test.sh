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
exec .venv/bin/python -m pytest "$@"

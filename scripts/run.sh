#!/usr/bin/env bash
# THE run command: installs mailbridge into .venv and runs the service with the settings in
# .env, mailbridge.toml or BRIDGE_CONFIG_FILE (arguments go to mailbridge; default: run).
#   cp .env.example .env && $EDITOR .env && bash scripts/run.sh
#   bash scripts/run.sh --config /etc/mailbridge/mailbridge.toml run
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f .env ] && [ ! -f mailbridge.toml ] && [ -z "${BRIDGE_CONFIG_FILE:-}" ] \
    && [ -z "${BRIDGE_TELEGRAM__TOKEN:-}" ] && [[ " $* " != *" --config "* ]]; then
    echo "scripts/run.sh: no settings here; copy .env.example to .env (or" \
        "mailbridge.example.toml to mailbridge.toml) and fill it in" >&2
    exit 2
fi
[ -f .env ] && chmod 600 .env
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check .
exec .venv/bin/mailbridge "${@:-run}"

#!/usr/bin/env bash
# THE run command: installs mailbridge into .venv and runs the service with the settings in .env.
#   cp .env.example .env && $EDITOR .env && bash scripts/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f .env ] && [ -z "${BRIDGE_TELEGRAM__TOKEN:-}" ]; then
    echo "scripts/run.sh: no .env here; copy .env.example to .env and fill it in" >&2
    exit 2
fi
[ -f .env ] && chmod 600 .env
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check .
exec .venv/bin/mailbridge "${@:-run}"

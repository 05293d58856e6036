#!/usr/bin/env bash
# Installs smallfirst, starts the whole stack on its embedded defaults and sends demo jobs through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/smallfirst dev "$@"

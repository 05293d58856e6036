#!/usr/bin/env bash
# The test command: installs what the tests need, then lint, types and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
SMALLFIRST_INSTALL_TEST_TOOLS=1 bash scripts/install.sh
echo "== ruff"; .venv/bin/ruff check .
echo "== mypy"; .venv/bin/mypy services tests bench scripts
echo "== pytest"; exec .venv/bin/pytest "$@"

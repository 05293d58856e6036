"""Headless Chromium (Debian's `chromium` and `chromium-driver`) driven by Selenium against the
whole stack: Redis, real vLLM inference servers, the frontier simulator, the API and the three
worker pools, started once for the module.

Selenium is given the system chromedriver, so Selenium Manager never looks for (or downloads) a
browser or a driver. Screenshots are test artifacts under `test-artifacts/browser/` (gitignored;
`SMALLFIRST_TEST_ARTIFACTS` moves them).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.e2e.conftest import INVOICE_ANSWER, JOB_LEASE_S
from tests.inference_fixtures import InferenceServerHandle
from tests.support.procs import require_binary

OPERATOR_KEY = "operator-key-of-the-browser-tests"
REPO_ROOT = Path(__file__).resolve().parents[2]
DESKTOP = (1280, 900)
PHONE = (390, 844)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    root = Path(os.environ.get("SMALLFIRST_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
    directory = root / "browser"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of Debian's Chromium and its chromedriver (missing: skipped locally, a failure in CI)."""
    return require_binary("chromium"), require_binary("chromedriver")


@pytest.fixture(scope="module")
def dashboard_stack(tmp_path_factory: pytest.TempPathFactory, chromium: tuple[str, str],
                    embedding_server_session: InferenceServerHandle,
                    generator_server_session: InferenceServerHandle) -> Iterator[Stack]:
    require_binary("redis-server")
    workdir = tmp_path_factory.mktemp("dashboard-stack")
    script = workdir / "frontier-script.yaml"
    script.write_text(yaml.safe_dump({"rules": [{"match": "INV-2041", "answer": INVOICE_ANSWER}]}))
    config = StackConfig(
        workdir=workdir, catalog_path=default_catalog_path(),
        frontier_sim_args=["--strategy", "scripted", "--script", str(script)],
        small_concurrency=4, frontier_concurrency=2, webhook_concurrency=2, job_lease_s=JOB_LEASE_S,
        sweep_interval_s=1.0,
        inference_ports={"embed": embedding_server_session.port, "generate": generator_server_session.port},
        # Live parts refresh every second, so a test sees an update without waiting long.
        extra_env={"SMALLFIRST_OPERATOR_KEY": OPERATOR_KEY, "SMALLFIRST_UI_REFRESH_S": "1"},
    )
    running = Stack(config)
    try:
        running.start_all()
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def dashboard_tenant(dashboard_stack: Stack) -> IssuedTenant:
    return TenantRegistry(redis.Redis.from_url(dashboard_stack.redis_url)).create(f"acme-{time.monotonic_ns()}")


@pytest.fixture(scope="module")
def tenant_api(dashboard_stack: Stack, dashboard_tenant: IssuedTenant) -> Iterator[httpx.Client]:
    """The JSON API as the module's tenant (jobs are submitted there, looked at in the browser)."""
    with httpx.Client(base_url=dashboard_stack.api_url, timeout=90,
                      headers={"Authorization": f"Bearer {dashboard_tenant.api_key}"}) as http:
        yield http


@pytest.fixture(scope="module")
def driver(chromium: tuple[str, str]) -> Iterator[WebDriver]:
    """One headless Chromium for the module, 1280 px wide."""
    binary, chromedriver = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", f"--window-size={DESKTOP[0]},{DESKTOP[1]}"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    browser.implicitly_wait(0)
    try:
        yield browser
    finally:
        browser.quit()

"""Fixtures for tests that talk to a real `smallfirst api` process (uvicorn) over HTTP.

Use as a pytest plugin (`pytest_plugins = ["tests.api_fixtures"]` in the root conftest) or import
the fixtures into a conftest. Everything is function-scoped because `redis_url` flushes Redis
before each test: tenants are created afresh and each test gets its own API process (~1 s).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.support.procs import ManagedProcess, free_port

API_START_TIMEOUT_S = 30.0


@dataclass
class ApiServer:
    url: str
    process: ManagedProcess


ApiServerFactory = Callable[..., ApiServer]


def _answers_healthz(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def api_server_factory(redis_url: str, catalog_path: Path, logs_dir: Path) -> Iterator[ApiServerFactory]:
    """Starts `smallfirst api` processes; keyword arguments become SMALLFIRST_<NAME> settings."""
    started: list[ManagedProcess] = []

    def start(**settings: object) -> ApiServer:
        port = free_port()
        env = {
            "SMALLFIRST_REDIS_URL": redis_url,
            "SMALLFIRST_CATALOG_PATH": str(catalog_path),
            # Tests receive callbacks on 127.0.0.1; refusing private targets is tested explicitly.
            "SMALLFIRST_ALLOW_PRIVATE_CALLBACKS": "true",
            "SMALLFIRST_LOG_LEVEL": "INFO",
            **{f"SMALLFIRST_{name.upper()}": str(value) for name, value in settings.items()},
        }
        argv = [sys.executable, "-m", "smallfirst.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
        process = ManagedProcess(f"api-{port}", argv, logs_dir, env=env).start()
        started.append(process)
        url = f"http://127.0.0.1:{port}"
        process.wait_ready(lambda: _answers_healthz(url), timeout_s=API_START_TIMEOUT_S)
        return ApiServer(url=url, process=process)

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def api_server(api_server_factory: ApiServerFactory) -> str:
    """Base URL of a running API with default settings (private callback targets allowed)."""
    return api_server_factory().url


TenantFactory = Callable[..., IssuedTenant]


@pytest.fixture
def tenant_factory(redis_url: str) -> Iterator[TenantFactory]:
    """Creates tenants in the test's Redis; arguments as TenantRegistry.create."""
    client = redis.Redis.from_url(redis_url)
    registry = TenantRegistry(client)
    yield registry.create
    client.close()


@pytest.fixture
def tenant(tenant_factory: TenantFactory) -> IssuedTenant:
    return tenant_factory("acme")


@pytest.fixture
def api_client(api_server: str, tenant: IssuedTenant) -> Iterator[httpx.Client]:
    """An HTTP client authenticated as `tenant` against `api_server`."""
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {tenant.api_key}"},
                      timeout=90) as client:
        yield client


@pytest.fixture
def job_store(redis_url: str) -> Iterator[JobStore]:
    """The workers' job store, for tests that play a worker ending a job."""
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, retention_s=3600, stale_after_s=900)
    client.close()

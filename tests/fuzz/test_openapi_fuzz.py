"""Property-based fuzzing of every operation in the API's own OpenAPI document (schemathesis),
against the real app under uvicorn on a real Redis: valid and invalid requests, authenticated as a
tenant. Whatever comes in, no answer is a 5xx and every 4xx has the documented error shape."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings

from smallfirst.common.tenants import TenantRegistry
from tests.support.procs import ManagedProcess, free_port
from tests.support.redis_server import RedisServer

# Examples per operation and mode: about two minutes for the whole document on a busy 2-core machine.
MAX_EXAMPLES = 20


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def fuzzed_api(redis_server: RedisServer, catalog_path: Path, logs_dir: Path) -> Iterator[tuple[str, str]]:
    """One API process for the whole run (its Redis emptied first) and a tenant's API key."""
    if not redis_server.alive():
        redis_server.restart()
    redis_server.flush()
    client = redis.Redis.from_url(redis_server.url)
    key = TenantRegistry(client).create("fuzz", quota_jobs_per_minute=100_000).api_key
    client.close()
    port = free_port()
    env = {"SMALLFIRST_REDIS_URL": redis_server.url, "SMALLFIRST_CATALOG_PATH": str(catalog_path),
           "SMALLFIRST_LOG_LEVEL": "WARNING", "SMALLFIRST_LONG_POLL_MAX_WAIT_S": "1"}
    argv = [sys.executable, "-m", "smallfirst.cli", "api", "--host", "127.0.0.1", "--port", str(port)]
    process = ManagedProcess(f"api-fuzz-{port}", argv, logs_dir, env=env).start()
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_ready(lambda: _answers(url), timeout_s=30)
        yield url, key
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_api: tuple[str, str]) -> Any:
    url, _ = fuzzed_api
    return schemathesis.openapi.from_url(f"{url}/openapi.json")


def assert_error_shape(response: Any) -> None:
    body = response.json()
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict), error
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str), error
    assert error["code"], error
    assert isinstance(error["message"], str), error


def has_inputs(operation: Any) -> bool:
    return any(len(part) for part in (operation.path_parameters, operation.query, operation.headers,
                                      operation.cookies, operation.body))


# Hypothesis is driven here, operation by operation, rather than through schemathesis's pytest
# decorator (`schemathesis.pytest.from_fixture`), which relies on a pytest internal (`_nodeid`)
# that pytest 9 no longer has.
@pytest.mark.fuzz
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
                         ids=lambda mode: mode.value)
def test_no_request_gets_a_5xx_and_every_4xx_has_the_error_shape(
        api_schema: Any, fuzzed_api: tuple[str, str], mode: schemathesis.GenerationMode) -> None:
    url, key = fuzzed_api
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 10
    statuses: Counter[int] = Counter()

    for operation in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and not has_inputs(operation):
            continue  # nothing in the request to make invalid (/healthz)

        @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            # given: a generated request for this operation, sent as an authenticated tenant
            # when
            response = case.call(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

            # then
            statuses[response.status_code] += 1
            label = f"{case.method} {case.formatted_path}"
            assert response.status_code < 500, f"{label}: {response.status_code} {response.text}"
            if 400 <= response.status_code < 500:
                assert_error_shape(response)

        check()

    # and: the requests reached the routes (successes for valid ones, refusals for invalid ones)
    if mode is schemathesis.GenerationMode.POSITIVE:
        assert sum(n for status, n in statuses.items() if status < 300) > len(operations), statuses
    else:
        assert sum(n for status, n in statuses.items() if 400 <= status < 500) > len(operations), statuses

"""Tenants cannot hurt each other: quotas on jobs in flight, stored bytes and submission rate, input
checks, and the memory guard, against a real API process on a real Redis started with a small
maxmemory (noeviction, as in production)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smallfirst.api.admission import CODE_REDIS_MEMORY_HIGH
from smallfirst.common.quotas import (
    CODE_BYTES_STORED,
    CODE_CONTROL_CHARACTERS,
    CODE_INPUT_TOO_LARGE,
    CODE_JOBS_IN_FLIGHT,
    CODE_RATE_LIMITED,
)
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.api import worker_sim
from tests.api_fixtures import ApiServerFactory
from tests.support.redis_server import RedisServer

MAXMEMORY_BYTES = 48 * 1024 * 1024
TASK = "banking77_intent"


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of its own with a small maxmemory and noeviction."""
    server = RedisServer(tmp_path / "redis-small", maxmemory_bytes=MAXMEMORY_BYTES).start()
    yield server
    server.stop()


@pytest.fixture
def small_redis_client(small_redis: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(small_redis.url)
    yield client
    client.close()


@pytest.fixture
def small_store(small_redis_client: redis.Redis) -> JobStore:
    return JobStore(small_redis_client, retention_s=3600, stale_after_s=900)


def api(url: str, tenant: IssuedTenant) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tenant.api_key}"}, timeout=30)


def job(text: str) -> dict[str, object]:
    return {"task": TASK, "input": {"text": text}}


def peak_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory_peak"])


def test_a_flooding_tenant_hits_its_quotas_while_another_tenants_jobs_keep_succeeding(
        small_redis: RedisServer, small_redis_client: redis.Redis, small_store: JobStore,
        api_server_factory: ApiServerFactory) -> None:
    # given an API on a Redis of 48 MiB, a tenant that floods jobs, one that floods bytes, and a
    # quiet tenant; every tenant's stored bytes are capped at 1 MiB by default
    tenants = TenantRegistry(small_redis_client)
    job_flooder = tenants.create("jobs", limits={"quota_max_jobs_in_flight": 300})
    byte_flooder = tenants.create("bytes")
    quiet = tenants.create("quiet")
    server = api_server_factory(redis_url=small_redis.url, default_max_bytes_stored=1024 * 1024,
                                default_submissions_per_s=100_000, default_submissions_burst=100_000)
    big_text = "é" * 1990  # within the task's 2000 characters, 3980 bytes

    # when the flooders send batch after batch, and the quiet tenant submits jobs that a worker answers
    refused: dict[str, list[dict[str, object]]] = {"jobs": [], "bytes": []}
    quiet_ids: list[str] = []
    with api(server.url, job_flooder) as jobs_api, api(server.url, byte_flooder) as bytes_api, \
            api(server.url, quiet) as quiet_api:
        for round_number in range(8):
            for name, client, text, count in (("jobs", jobs_api, "card?", 100), ("bytes", bytes_api, big_text, 100)):
                response = client.post("/v1/jobs/batch", json={"jobs": [job(text)] * count})
                if response.status_code == 429:
                    refused[name].append({"code": response.json()["error"]["code"],
                                          "retry_after": response.headers.get("Retry-After")})
                else:
                    assert response.status_code == 202, response.text
                    items = response.json()["results"]
                    refused[name] += [{"code": i["error"]["code"], "retry_after": "item"}
                                      for i in items if i["status"] == 429]
            submitted = quiet_api.post("/v1/jobs", json=job(f"My card has not arrived ({round_number})"))
            assert submitted.status_code == 202, submitted.text
            quiet_ids.append(submitted.json()["id"])
            worker_sim.succeed(small_store, quiet_ids[-1], answer={"label": "card_arrival"})
        quiet_jobs = [quiet_api.get(f"/v1/jobs/{job_id}").json() for job_id in quiet_ids]

    # then each flooder was refused with 429 and its quota's code, with a Retry-After
    assert refused["jobs"]
    assert {r["code"] for r in refused["jobs"]} == {CODE_JOBS_IN_FLIGHT}
    assert refused["bytes"]
    assert {r["code"] for r in refused["bytes"]} == {CODE_BYTES_STORED}
    assert all(r["retry_after"] for r in refused["jobs"] + refused["bytes"])
    # and the quiet tenant's jobs were all accepted and answered
    assert [j["status"] for j in quiet_jobs] == ["succeeded"] * 8
    # and Redis never came near its maxmemory
    assert peak_memory(small_redis_client) < MAXMEMORY_BYTES


def test_above_the_memory_high_water_mark_new_work_is_refused_and_accepted_work_finishes(
        small_redis: RedisServer, small_redis_client: redis.Redis, small_store: JobStore,
        api_server_factory: ApiServerFactory) -> None:
    # given a job accepted while Redis had room
    tenant = TenantRegistry(small_redis_client).create("acme")
    server = api_server_factory(redis_url=small_redis.url, redis_memory_check_interval_s=0.01)
    with api(server.url, tenant) as client:
        accepted = client.post("/v1/jobs", json=job("Where is my card?")).json()["id"]

        # when something else fills Redis past 85 % of its maxmemory (the guard's high-water mark)
        filler = b"x" * (256 * 1024)
        n = 0
        while int(small_redis_client.info("memory")["used_memory"]) < 0.88 * MAXMEMORY_BYTES:
            small_redis_client.set(f"test:filler:{n}", filler, ex=600)
            n += 1
        refused = client.post("/v1/jobs", json=job("Where is my card?"))
        refused_batch = client.post("/v1/jobs/batch", json={"jobs": [job("card?")]})
        finished = worker_sim.succeed(small_store, accepted, answer={"label": "card_arrival"})

        # and when the room is given back
        for key in small_redis_client.scan_iter("test:filler:*"):
            small_redis_client.delete(key)
        again = client.post("/v1/jobs", json=job("Where is my card?"))

    # then new work was refused with 503 redis_memory_high and a Retry-After, while the accepted
    # job still finished; with room again, work is accepted
    for response in (refused, refused_batch):
        assert response.status_code == 503
        assert response.json()["error"]["code"] == CODE_REDIS_MEMORY_HIGH
        assert int(response.headers["Retry-After"]) >= 1
    assert finished.status.value == "succeeded"
    assert again.status_code == 202


def test_submissions_beyond_the_rate_and_burst_are_429_rate_limited(
        api_server_factory: ApiServerFactory, redis_url: str) -> None:
    # given a tenant allowed 1 submission per second with a burst of 3
    tenant = TenantRegistry(redis.Redis.from_url(redis_url)).create(
        "bursty", limits={"quota_submissions_per_s": 1, "quota_submissions_burst": 3})
    server = api_server_factory()

    # when it sends five jobs at once
    with api(server.url, tenant) as client:
        statuses = [client.post("/v1/jobs", json=job("card?")) for _ in range(5)]

    # then the burst is accepted and the rest is refused with a Retry-After
    assert [r.status_code for r in statuses[:3]] == [202, 202, 202]
    assert statuses[4].status_code == 429
    assert statuses[4].json()["error"]["code"] == CODE_RATE_LIMITED
    assert int(statuses[4].headers["Retry-After"]) >= 1


def test_input_is_limited_in_utf8_bytes_and_may_not_hold_control_characters(
        api_server_factory: ApiServerFactory, redis_url: str) -> None:
    # given a tenant whose jobs may have at most 100 bytes of input
    tenant = TenantRegistry(redis.Redis.from_url(redis_url)).create(
        "strict", limits={"quota_max_input_bytes": 100})
    server = api_server_factory()

    # when it sends 60 characters that are 120 UTF-8 bytes, a NUL, a carriage return, and tab and newline
    with api(server.url, tenant) as client:
        too_big = client.post("/v1/jobs", json=job("é" * 60))
        nul = client.post("/v1/jobs", json=job("card\x00arrived"))
        escape = client.post("/v1/jobs", json=job("card\x1b[31m"))
        fine = client.post("/v1/jobs", json=job("card\tarrived\nyesterday"))

    # then bytes are counted, control characters other than tab and newline refused
    assert too_big.status_code == 413
    assert too_big.json()["error"]["code"] == CODE_INPUT_TOO_LARGE
    assert too_big.json()["error"]["details"]["input_bytes"] == 120
    for response in (nul, escape):
        assert response.status_code == 422
        assert response.json()["error"]["code"] == CODE_CONTROL_CHARACTERS
    assert nul.json()["error"]["details"]["found"][0]["codepoint"] == "U+0000"
    assert fine.status_code == 202

"""Frontier batch mode end to end: jobs submitted to the API go out in Message Batches through the
frontier pool (real Celery worker, real Redis, the real `anthropic` SDK against the simulator's
/v1/messages/batches), end through the same outcome function as realtime answers, are billed at the
batch price, and survive a SIGKILL of the batcher between create and record and of the poller
mid-results."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from smallfirst.cli.stack import Component, Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.jobs import Usage
from smallfirst.common.pricing import default_price_table
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.support.procs import require_binary, wait_until

TASK = "email_summary"  # routed to the frontier tier by the example catalog
SIM_ENV = {
    "SMALLFIRST_FRONTIER_SIM_BATCH_PROCESSING_S": "0.5",
    "SMALLFIRST_FRONTIER_SIM_BATCH_CANCEL_S": "0.2",
    "SMALLFIRST_FRONTIER_SIM_LOG_LEVEL": "warning",
}
# Small batches on a short clock, and locks short enough that a killed process's expire in seconds.
WORKER_ENV = {
    "SMALLFIRST_FRONTIER_BATCH_MAX_REQUESTS": "100",
    "SMALLFIRST_FRONTIER_BATCH_MAX_AGE_S": "1.0",
    "SMALLFIRST_FRONTIER_BATCH_POLL_INTERVAL_S": "0.3",
    "SMALLFIRST_FRONTIER_BATCH_CREATE_TIMEOUT_S": "2",
    "SMALLFIRST_FRONTIER_BATCH_LOCK_TTL_S": "3",
    "SMALLFIRST_FRONTIER_BATCH_POLL_LOCK_TTL_S": "2",
    "SMALLFIRST_FRONTIER_BATCH_CLOCK_SKEW_S": "30",
    "SMALLFIRST_FRONTIER_BATCH_MIN_TIME_LEFT_S": "0",
    "SMALLFIRST_FRONTIER_BATCH_MAX_TRIES": "3",
    # A retry's delayed message held by a killed worker is re-published by the sweeper once the job
    # is this stale (the queue being empty).
    "SMALLFIRST_SWEEP_STALE_AFTER_S": "5",
    "SMALLFIRST_SWEEP_INTERVAL_S": "1",
}


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, the simulator (errored and expired results injected) and the API; each test starts
    the frontier workers it needs."""
    require_binary("redis-server")
    config = StackConfig(workdir=tmp_path_factory.mktemp("batch-stack"), catalog_path=default_catalog_path(),
                         extra_env={
                             **SIM_ENV,
                             "SMALLFIRST_FRONTIER_SIM_BATCH_ERRORED_RATE": "0.05",
                             "SMALLFIRST_FRONTIER_SIM_BATCH_EXPIRED_RATE": "0.05"}, frontier_concurrency=8)
    stack = Stack(config)
    try:
        stack.start_redis()
        stack.start_frontier_sim()
        stack.start_api()
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def sim(batch_stack: Stack) -> Iterator[httpx.Client]:
    assert batch_stack.frontier_base_url is not None
    with httpx.Client(base_url=batch_stack.frontier_base_url, timeout=10) as http:
        http.post("/_sim/reset").raise_for_status()
        yield http


@pytest.fixture
def store_redis(batch_stack: Stack) -> redis.Redis:
    return redis.Redis.from_url(batch_stack.redis_url)


@pytest.fixture
def tenant(store_redis: redis.Redis) -> IssuedTenant:
    return TenantRegistry(store_redis).create(f"batch-{time.monotonic_ns()}")


@pytest.fixture
def api(batch_stack: Stack, tenant: IssuedTenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=batch_stack.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                      timeout=60) as http:
        yield http


@pytest.fixture
def workers(batch_stack: Stack) -> Iterator[list[Component]]:
    """Frontier workers a test starts (stopped after it)."""
    started: list[Component] = []
    yield started
    for worker in started:
        worker.stop()


def start_frontier_worker(stack: Stack, workers: list[Component], name: str, **env: str) -> Component:
    worker = stack.start_worker(k.POOL_FRONTIER, name=name, env={**WORKER_ENV, **env})
    workers.append(worker)
    return worker


def submit_low_priority(api: httpx.Client, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 500):
        items = [{"task": TASK, "input": {"text": f"Hello, please move my order {n} to Friday. Anna"},
                  "priority": "low", "frontier_mode": "auto"} for n in range(start, min(count, start + 500))]
        response = api.post("/v1/jobs/batch", json={"jobs": items})
        assert response.status_code in (200, 202, 207), response.text[:500]
        for item in response.json()["results"]:
            assert item["status"] == 202, item
            ids.append(item["job"]["id"])
    return ids


def stats(api: httpx.Client) -> dict[str, Any]:
    totals: dict[str, Any] = api.get("/v1/stats").json()["totals"]
    return totals


def wait_for_all_ended(api: httpx.Client, count: int, timeout_s: float) -> dict[str, Any]:
    wait_until(lambda: stats(api)["jobs_ended"] >= count, timeout_s, f"{count} jobs to end", 0.5)
    return stats(api)


def jobs(api: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    return [api.get(f"/v1/jobs/{job_id}").json() for job_id in ids]


def batch_price(attempt: dict[str, Any]) -> float:
    usage = Usage.model_validate(attempt["usage"])
    return default_price_table().cost_usd(attempt["model"], usage, batch=True)


def sim_batches(sim: httpx.Client) -> dict[str, Any]:
    batches: dict[str, Any] = sim.get("/_sim/stats", params={"log": "false"}).json()["batches"]
    return batches


@pytest.mark.e2e
def test_500_low_priority_jobs_go_out_in_batches_end_once_at_the_batch_price_and_failed_requests_are_retried(
        batch_stack: Stack, sim: httpx.Client, api: httpx.Client, workers: list[Component]) -> None:
    # given: a frontier pool, and a simulator that answers 5% of batched requests errored, 5% expired
    start_frontier_worker(batch_stack, workers, "worker-frontier-a")

    # when: 500 low-priority jobs in auto mode
    ids = submit_low_priority(api, 500)
    totals = wait_for_all_ended(api, 500, timeout_s=300)
    ended = jobs(api, ids)

    # then: every job succeeded, once, routed to batch mode by its low priority
    assert totals["jobs_ended"] == 500
    assert totals["by_status"]["succeeded"] == 500
    assert all(j["status"] == "succeeded" for j in ended)
    assert {j["route"]["frontier_mode"] for j in ended} == {"batch"}
    assert {j["route"]["frontier_mode_source"] for j in ended} == {"job:auto:low_priority"}
    # and they went out in batches, each request once
    batched = [a for j in ended for a in j["attempts"] if a["batched"]]
    sent = sim_batches(sim)
    assert sent["custom_ids_sent_more_than_once"] == []
    assert sent["requests_total"] == len(batched)
    assert 5 <= sent["created"] < 500
    # and errored and expired results were retried, in later batches, until they succeeded
    retried = [j for j in ended if len(j["attempts"]) > 1]
    assert sent["results_by_type"].get("errored", 0) > 0
    assert sent["results_by_type"].get("expired", 0) > 0
    failed_tries = sum(1 for j in ended for a in j["attempts"] if a["outcome"] == "retried")
    assert failed_tries == sent["results_by_type"]["errored"] + sent["results_by_type"]["expired"]
    for job in retried:
        assert [a["outcome"] for a in job["attempts"][:-1]] == ["retried"] * (len(job["attempts"]) - 1)
        assert all(not a["billed"] for a in job["attempts"][:-1])
    # and each job is billed once, at the batch price of its answer's tokens
    for job in ended:
        accepted = job["attempts"][-1]
        assert accepted["outcome"] == "accepted"
        assert accepted["billed"]
        if accepted["batched"]:
            assert job["cost_usd"] == pytest.approx(batch_price(accepted), rel=1e-6)
    all_batched = [j for j in ended if j["attempts"][-1]["batched"]]
    assert len(all_batched) >= 495  # a job may run in real time after 3 failed batch tries
    assert totals["batch_cost_usd"] == pytest.approx(sum(j["cost_usd"] for j in all_batched), rel=1e-6)
    # and saved by batching is the other half of the realtime price (the file's factor is 0.5)
    assert totals["batch_savings_usd"] == pytest.approx(totals["batch_cost_usd"], rel=1e-6)
    assert totals["attempts_batched"] == len(batched)


@pytest.mark.faults
def test_a_batcher_killed_between_create_and_record_sends_nothing_twice_and_loses_no_job(
        batch_stack: Stack, sim: httpx.Client, api: httpx.Client, workers: list[Component],
        store_redis: redis.Redis) -> None:
    # given: a frontier worker that SIGKILLs itself right after its first batch was created
    doomed = start_frontier_worker(batch_stack, workers, "worker-frontier-doomed",
                                   SMALLFIRST_FRONTIER_BATCH_KILL_AT="after_create")
    ids = submit_low_priority(api, 40)
    wait_until(lambda: not doomed.alive(), 60, "the batcher to kill itself after create")
    assert store_redis.zcard(k.BATCH_INTENTS_KEY) >= 1  # the batch id was never recorded
    created_before_restart = sim_batches(sim)["created"]
    assert created_before_restart >= 1

    # when: a worker starts again and reconciles with the provider's batch list
    start_frontier_worker(batch_stack, workers, "worker-frontier-b")
    totals = wait_for_all_ended(api, 40, timeout_s=120)

    # then: the orphaned batch was adopted, no request went out twice, every job ended once
    sent = sim_batches(sim)
    assert sent["custom_ids_sent_more_than_once"] == []
    assert sent["requests_total"] == sum(len(j["attempts"]) for j in jobs(api, ids))
    assert totals["jobs_ended"] == 40
    assert store_redis.zcard(k.BATCH_INTENTS_KEY) == 0
    assert all(j["status"] == "succeeded" for j in jobs(api, ids))


@pytest.mark.faults
def test_a_poller_killed_mid_results_resumes_and_ends_every_job_once_billed_once(
        batch_stack: Stack, sim: httpx.Client, api: httpx.Client, workers: list[Component],
        store_redis: redis.Redis) -> None:
    # given: a frontier worker that SIGKILLs itself after handing the 5th result of a batch
    doomed = start_frontier_worker(batch_stack, workers, "worker-frontier-poller-doomed",
                                   SMALLFIRST_FRONTIER_BATCH_KILL_AT="after_handle",
                                   SMALLFIRST_FRONTIER_BATCH_KILL_AFTER="5")
    ids = submit_low_priority(api, 30)
    wait_until(lambda: not doomed.alive(), 60, "the poller to kill itself mid-results")
    handled_at_kill = sum(store_redis.scard(k.batch_handled_key(b.decode()))
                          for b in store_redis.zrange(k.BATCH_ACTIVE_KEY, 0, -1))
    assert stats(api)["jobs_ended"] < 30
    assert handled_at_kill >= 5  # the 5th result's handling (and its mark) committed before the kill

    # when
    start_frontier_worker(batch_stack, workers, "worker-frontier-c")
    totals = wait_for_all_ended(api, 30, timeout_s=120)

    # then: each job ended once and was billed once: the counters equal the jobs' own figures
    ended = jobs(api, ids)
    assert totals["jobs_ended"] == 30
    assert all(j["status"] == "succeeded" for j in ended)
    assert totals["cost_usd"] == pytest.approx(sum(j["cost_usd"] for j in ended), rel=1e-6)
    assert sum(1 for j in ended for a in j["attempts"] if a["billed"]) == 30
    assert sim_batches(sim)["custom_ids_sent_more_than_once"] == []

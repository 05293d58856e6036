"""A small worker killed (SIGKILL) while it runs a batch of classify jobs delivered several to a message
(`TASK_RUN_SMALL_MANY`): every accepted job still ends once, billed once per tier. Real Redis, API,
small and frontier pools, the frontier simulator, and the embedding service running real vLLM."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.jobs import Job
from smallfirst.common.tenants import TenantRegistry
from tests.faults.conftest import FAULT_ENV
from tests.inference_fixtures import InferenceServerHandle
from tests.support.procs import require_binary

pytestmark = [pytest.mark.faults, pytest.mark.vllm]

JOBS = 240
TEXTS = ["I still have not received my new card", "How do I top up with a cheque?",
         "My transfer has been pending for days", "What exchange rate do you use?"]


@pytest.fixture(scope="module")
def small_stack(tmp_path_factory: pytest.TempPathFactory,
                embedding_server_session: InferenceServerHandle) -> Iterator[Stack]:
    require_binary("redis-server")
    workdir: Path = tmp_path_factory.mktemp("small-kill")
    running = Stack(StackConfig(workdir=workdir, catalog_path=default_catalog_path(), small_concurrency=8,
                                frontier_concurrency=8, job_lease_s=10, sweep_interval_s=1.0,
                                inference_ports={"embed": embedding_server_session.port},
                                extra_env={**FAULT_ENV, "SMALLFIRST_SMALL_JOBS_PER_MESSAGE": "8"}))
    try:
        running.start_redis()
        running.start_frontier_sim()
        running.start_api()
        running.start_worker(k.POOL_SMALL)
        running.start_worker(k.POOL_FRONTIER)
        yield running
    finally:
        running.stop_all()


def stored_jobs(client: redis.Redis, ids: list[str]) -> list[Job]:
    return [Job.model_validate_json(raw) for raw in client.mget([k.job_key(i) for i in ids]) if raw is not None]


def test_a_small_worker_killed_mid_batch_leaves_every_job_ended_once_and_billed_once(small_stack: Stack) -> None:
    # given a batch of classify jobs streaming through the small pool, several jobs to a message
    client = redis.Redis.from_url(small_stack.redis_url)
    issued = TenantRegistry(client).create("kill-test", limits={
        "quota_submissions_per_s": 100000.0, "quota_submissions_burst": 100000})
    body = {"jobs": [{"task": "banking77_intent", "input": {"text": TEXTS[i % len(TEXTS)] + f" (ref {i})"}}
                     for i in range(JOBS)]}
    with httpx.Client(base_url=small_stack.api_url, headers={"Authorization": f"Bearer {issued.api_key}"},
                      timeout=60) as api:
        created = api.post("/v1/jobs/batch", json=body)
        assert created.status_code in (200, 202), created.text
        ids = [item["job"]["id"] for item in created.json()["results"]]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ended = sum(1 for job in stored_jobs(client, ids) if job.status.terminal)
        if ended >= 16:
            break
        time.sleep(0.02)
    assert ended < JOBS, "the batch ended before the worker could be killed: make it larger"

    # when the small worker is killed with jobs in hand, and comes back
    small_stack[f"worker-{k.POOL_SMALL}"].kill()
    small_stack.start_worker(k.POOL_SMALL)

    # then every job ends, succeeded, with exactly one billed attempt per tier it reached
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        jobs = stored_jobs(client, ids)
        if len(jobs) == JOBS and all(job.status.terminal for job in jobs):
            break
        time.sleep(0.5)
    jobs = stored_jobs(client, ids)
    assert len(jobs) == JOBS
    assert Counter(job.status.value for job in jobs) == {"succeeded": JOBS}
    for job in jobs:
        billed = Counter(attempt.tier.value for attempt in job.attempts if attempt.billed)
        assert billed["small"] <= 1, job.model_dump_json()
        assert billed["frontier"] <= 1, job.model_dump_json()
        assert billed["small"] + billed["frontier"] >= 1, job.model_dump_json()
    # and the ends were counted once each, and the jobs did travel several to a message
    ended_count = client.hget(k.stats_key(issued.tenant.id, "banking77_intent"), "jobs_ended")
    assert ended_count is not None
    assert int(ended_count) == JOBS
    deliveries = Counter(attempt.task_id for job in jobs for attempt in job.attempts if attempt.tier.value == "small")
    assert max(deliveries.values()) > 1
    client.close()

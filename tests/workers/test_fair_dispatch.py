"""Fair scheduling with real processes: redis-server, the frontier simulator (answering after a
delay), the API and a frontier pool whose elected dispatcher feeds the frontier queue. Tenant A
queues a batch; tenant B's single jobs, submitted after it, start long before A's batch is done.
Counts, not durations: how many of A's jobs started between B's submission and B's start."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.jobs import Job
from smallfirst.common.tenants import TenantRegistry
from tests.support.procs import require_binary

pytestmark = pytest.mark.e2e

CONCURRENCY = 4
DEPTH = 4
A_JOBS = 300
B_JOBS = 5
BODY = {"task": "email_summary", "input": {"text": "Can we move the call to Tuesday? Kim"}, "tier": "frontier"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("redis-server")
    running = Stack(StackConfig(workdir=tmp_path_factory.mktemp("fair"), catalog_path=default_catalog_path(),
                                frontier_sim_args=["--latency-ms", "100"], frontier_concurrency=CONCURRENCY,
                                extra_env={"SMALLFIRST_FAIR_QUEUE_DEPTH": str(DEPTH),
                                           "SMALLFIRST_LOG_JSON": "false"}))
    try:
        running.start_redis()
        running.start_frontier_sim()
        running.start_api()
        running.start_worker(k.POOL_FRONTIER)
        yield running
    finally:
        running.stop_all()


def api(stack: Stack, client: redis.Redis, tenant_id: str) -> httpx.Client:
    issued = TenantRegistry(client).create(tenant_id, tenant_id=tenant_id, limits={
        "quota_submissions_per_s": 100000.0, "quota_submissions_burst": 100000})
    return httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {issued.api_key}"}, timeout=60)


def jobs(client: redis.Redis, ids: list[str]) -> list[Job]:
    return [Job.model_validate_json(raw) for raw in client.mget([k.job_key(i) for i in ids]) if raw is not None]


def test_a_late_tenants_jobs_start_behind_a_few_of_a_large_batch_not_behind_the_batch(stack: Stack) -> None:
    # given tenant A's batch of 300 queued jobs
    client = redis.Redis.from_url(stack.redis_url)
    with api(stack, client, "tenant-a") as a, api(stack, client, "tenant-b") as b:
        batch = a.post("/v1/jobs/batch", json={"jobs": [BODY] * A_JOBS}).json()
        a_ids = [item["job"]["id"] for item in batch["results"]]

        # when tenant B submits single jobs after it
        b_ids = []
        for _ in range(B_JOBS):
            response = b.post("/v1/jobs", json=BODY)
            assert response.status_code == 202
            b_ids.append(response.json()["id"])
        deadline = time.monotonic() + 120
        while not all(job.attempts for job in jobs(client, b_ids)) and time.monotonic() < deadline:
            time.sleep(0.1)
    b_jobs = jobs(client, b_ids)
    a_jobs = jobs(client, a_ids)

    # then each of B's jobs started while most of A's batch still waited, behind only a few of A's:
    # at most the queue's depth, the pool's threads and A's turn (without fair scheduling: ~300)
    assert all(job.attempts for job in b_jobs)
    for job in b_jobs:
        started = job.attempts[0].started_at
        overtaking = [a_job for a_job in a_jobs
                      if a_job.attempts and job.created_at <= a_job.attempts[0].started_at <= started]
        assert len(overtaking) <= 2 * (DEPTH + CONCURRENCY), (job.id, len(overtaking))
    assert sum(1 for a_job in a_jobs if not a_job.attempts) > A_JOBS / 2
    # and the backlog the gauge and KEDA read is A's waiting jobs
    assert client.llen(k.fair_backlog_key(k.QUEUE_FRONTIER)) > A_JOBS / 2
    client.close()

"""A crash between accepting a job and publishing its message: the job ends all the same, once.

Real processes: redis-server, the frontier simulator and a frontier worker pool (whose sweeper
runs); the API's accept transaction is the API's own code (`AsyncJobStore.create_many`), and the
crash is that nothing publishes after it (an API process that died there), or that Redis itself is
SIGKILLed right after it and restarted on its AOF."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.jobs import Job, JobStatus, Tier
from smallfirst.common.store import JobStore
from tests.support.procs import require_binary
from tests.workers.test_sweeper import make_job, store_as_the_api_does

pytestmark = pytest.mark.faults

END_TIMEOUT_S = 90.0


@pytest.fixture
def frontier_stack(tmp_path: Path, catalog_path: Path) -> Iterator[Stack]:
    """Redis, the simulator and a frontier pool sweeping every half second (outbox grace 1 s)."""
    require_binary("redis-server")
    stack = Stack(StackConfig(workdir=tmp_path, catalog_path=catalog_path, frontier_concurrency=2,
                              sweep_interval_s=0.5, extra_env={"SMALLFIRST_SWEEP_OUTBOX_GRACE_S": "1"}))
    try:
        stack.start_redis()
        stack.start_frontier_sim()
        stack.start_worker(k.POOL_FRONTIER)
        yield stack
    finally:
        stack.stop_all()


def wait_until_ended(store: JobStore, job_ids: list[str]) -> list[Job]:
    deadline = time.monotonic() + END_TIMEOUT_S
    while True:
        try:
            jobs = [store.get(job_id) for job_id in job_ids]
            if all(job.status.terminal for job in jobs) or time.monotonic() > deadline:
                return jobs
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def test_jobs_stored_by_an_api_that_died_before_publishing_end_once(frontier_stack: Stack) -> None:
    # given: three frontier jobs accepted (the API's transaction applied) and never published
    jobs = [make_job(tier=Tier.FRONTIER) for _ in range(3)]
    store_as_the_api_does(frontier_stack.redis_url, jobs)
    store = JobStore(redis.Redis.from_url(frontier_stack.redis_url, socket_timeout=5), retention_s=3600,
                     stale_after_s=900)

    # when: only the worker pool's sweeper is left to notice
    ended = wait_until_ended(store, [job.id for job in jobs])

    # then: each succeeded, with exactly one billed attempt, and the outbox is empty
    assert [job.status for job in ended] == [JobStatus.SUCCEEDED] * 3
    assert [sum(1 for a in job.attempts if a.billed) for job in ended] == [1, 1, 1]
    assert store.redis.zcard(k.PUBLISH_OUTBOX_KEY) == 0


def test_a_job_accepted_just_before_redis_was_killed_ends_once_after_the_restart(frontier_stack: Stack) -> None:
    # given: a job accepted, then Redis SIGKILLed before anything published its message
    job = make_job(tier=Tier.FRONTIER)
    store_as_the_api_does(frontier_stack.redis_url, [job])
    assert frontier_stack.redis is not None
    frontier_stack.redis.kill()

    # when: Redis comes back on its AOF
    frontier_stack.redis.start()
    store = JobStore(redis.Redis.from_url(frontier_stack.redis_url, socket_timeout=5), retention_s=3600,
                     stale_after_s=900)
    [ended] = wait_until_ended(store, [job.id])

    # then: the accepted job survived the crash and ended once
    assert ended.status is JobStatus.SUCCEEDED
    assert sum(1 for a in ended.attempts if a.billed) == 1

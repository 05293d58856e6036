"""The batch lane in one process against a real Redis and the simulator's Message Batches API (real
SDK): a batched attempt ends through `JobExecution.finish` billed at the batch price, and a cancelled
job's request is withdrawn from the buffer, or its batch cancelled, and the job stays cancelled."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import pytest
import redis

from smallfirst.api.service import withdraw_batched_request
from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.catalog import Catalog
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import FrontierMode, Job, JobStatus, RouteDecision, RouteReason, Tier
from smallfirst.common.pricing import default_price_table
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore
from smallfirst.frontier_worker.batch_lane import BatchLane, BatchPolicy
from smallfirst.frontier_worker.batches import BatchBuffer, BatchConfig, BatchPoller, ResultHandler
from tests.frontier_fixtures import SimControl
from tests.support.procs import wait_until

CONFIG = BatchConfig(max_requests=100, max_age_s=0.0, create_timeout_s=2.0, lock_ttl_s=3.0, clock_skew_s=30.0,
                     poll_lock_ttl_s=2.0, record_ttl_s=3600)
POLICY = BatchPolicy(lease_s=90_000, max_tries=2, min_time_left_s=0)


@pytest.fixture
def quick_sim(start_frontier_sim: Callable[..., SimControl]) -> SimControl:
    """A simulator whose batches end 2 s after creation (cancelled ones 0.2 s after the cancel)."""
    return start_frontier_sim(BATCH_PROCESSING_S="2", BATCH_CANCEL_S="0.2")


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), retention_s=3600, stale_after_s=600)


@pytest.fixture
def lane(store: JobStore, redis_url: str, catalog_path: Path, catalog: Catalog, quick_sim: SimControl) -> BatchLane:
    settings = CoreSettings(redis_url=redis_url, catalog_path=catalog_path)
    execution = JobExecution(store, Publisher(make_celery(settings)), catalog, lease_s=60, worker_name="test")
    sdk = anthropic.Anthropic(api_key="sk-test", base_url=quick_sim.url, max_retries=0)

    def make_poller(handle: ResultHandler) -> BatchPoller:
        return BatchPoller(store.redis, sdk, handle, CONFIG)

    return BatchLane(execution, BatchBuffer(store.redis, sdk, CONFIG), default_price_table(), POLICY,
                     make_poller=make_poller)


def batch_job(store: JobStore, job_id: str = "job_batch1") -> Job:
    now = time.time()
    job = Job(id=job_id, tenant="t1", task="email_summary", input={"text": "Please move my order to Friday."},
              route=RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.TASK_DEFAULT,
                                  frontier_mode=FrontierMode.BATCH, frontier_mode_source="job"),
              created_at=now, updated_at=now, queued_at=now, deadline_at=now + 3600)
    store.create(job)
    return job


def cancel(store: JobStore, job_id: str) -> None:
    """What the API's cancel writes, in one transaction."""
    store.transition(job_id, lambda j: lifecycle.cancel(j, now=time.time()), effects=withdraw_batched_request)


def test_a_batched_answer_ends_its_job_through_the_outcome_function_at_the_batch_price(
        lane: BatchLane, store: JobStore, quick_sim: SimControl) -> None:
    # given: a job routed to batch mode, claimed and buffered
    job = batch_job(store)
    assert lane.wants(job.id)
    ctx = lane.submit(job.id, "delivery-1")
    assert ctx is not None
    assert lane.buffer.pending() == 1

    # when: the lane sends the batch and polls until it ended
    wait_until(lambda: lane.run_once() is not None and store.get(job.id).status.terminal, 20, "the job to end", 0.2)

    # then
    ended = store.get(job.id)
    attempt = ended.attempts[-1]
    assert ended.status is JobStatus.SUCCEEDED
    assert len(ended.attempts) == 1
    assert attempt.batched
    assert attempt.lease_expires_at - attempt.started_at == pytest.approx(POLICY.lease_s)
    assert attempt.cost_usd == pytest.approx(default_price_table().cost_usd(attempt.model, attempt.usage, batch=True))
    assert attempt.estimated_frontier_cost_usd == pytest.approx(2 * attempt.cost_usd)
    stats = {key.decode(): float(v) for key, v in store.redis.hgetall(k.stats_key("t1", "email_summary")).items()}
    assert stats["cost_usd:batch"] == pytest.approx(attempt.cost_usd)
    assert stats["batch_savings_usd"] == pytest.approx(attempt.cost_usd)
    # and the result was marked handled in the job's own transaction; a second delivery does nothing
    assert store.redis.zcard(k.BATCH_ACTIVE_KEY) == 0
    assert lane.submit(job.id, "delivery-2") is None
    assert quick_sim.stats()["batches"]["created"] == 1


def test_a_job_cancelled_while_buffered_is_never_sent(lane: BatchLane, store: JobStore,
                                                      quick_sim: SimControl) -> None:
    # given
    job = batch_job(store)
    lane.submit(job.id, "delivery-1")

    # when
    cancel(store, job.id)
    counts = lane.run_once()

    # then
    assert counts["withdrawn"] == 1
    assert counts["batches_sent"] == 0
    assert lane.buffer.pending() == 0
    assert quick_sim.stats()["batches"]["created"] == 0
    assert store.get(job.id).status is JobStatus.CANCELLED


def test_a_job_cancelled_after_its_batch_was_sent_has_the_batch_cancelled_and_stays_cancelled_unbilled(
        lane: BatchLane, store: JobStore, quick_sim: SimControl) -> None:
    # given: the job's request went out alone in a batch
    job = batch_job(store)
    lane.submit(job.id, "delivery-1")
    assert len(lane.buffer.flush()) == 1

    # when
    cancel(store, job.id)
    lane.run_once()
    wait_until(lambda: lane.run_once() is not None and store.redis.zcard(k.BATCH_ACTIVE_KEY) == 0, 20,
               "the cancelled batch to be handled", 0.2)

    # then: the provider cancelled the batch, the result was dropped by the compare-and-set
    batches = quick_sim.stats()["batches"]
    assert batches["results_by_type"] == {"canceled": 1}
    ended = store.get(job.id)
    assert ended.status is JobStatus.CANCELLED
    assert ended.total_cost_usd() == 0
    assert not any(a.billed for a in ended.attempts)

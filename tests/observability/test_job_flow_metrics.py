"""Queue depth and job counters follow jobs through the real pieces: the project's Celery app on a real
Redis broker, the job store, and `JobExecution` (what both worker pools run), with this test taking
each delivery from its queue the way a worker's consumer does."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import redis
from celery import Celery
from kombu.message import Message
from prometheus_client import CollectorRegistry

from smallfirst.common import constants as k
from smallfirst.common.catalog import Catalog
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import Job, JobStatus, Priority, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.common.metrics import PHASE_QUEUE_WAIT, PHASE_RUN, JobMetrics, QueueCollector
from smallfirst.common.outcome import AttemptResult
from smallfirst.common.queues import Publisher
from smallfirst.common.store import JobStore

TASK = "banking77_intent"


@dataclass
class Delivery:
    job_id: str
    task_id: str
    task_name: str
    message: Message


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def job_store(redis_url: str) -> Iterator[JobStore]:
    client = redis.Redis.from_url(redis_url)
    yield JobStore(client, retention_s=3600, stale_after_s=900)
    client.close()


@pytest.fixture
def execution(job_store: JobStore, celery_app: Celery, catalog: Catalog, registry: CollectorRegistry) -> JobExecution:
    """What a worker pool runs for each delivery, counting into `registry`."""
    return JobExecution(job_store, Publisher(celery_app), catalog, lease_s=600, worker_name="test-worker",
                        metrics=JobMetrics(registry))


@pytest.fixture
def queue_collector(redis_url: str, registry: CollectorRegistry) -> Iterator[QueueCollector]:
    collector = QueueCollector(redis_url)
    registry.register(collector)
    yield collector
    collector.close()


@contextmanager
def delivery_from(app: Celery, queue: str) -> Iterator[Delivery]:
    """Take the next message of `queue` as a worker's consumer does (unacknowledged until the block ends)."""
    with app.connection_for_read() as connection:
        consumer = connection.SimpleQueue(queue, no_ack=False)
        message = consumer.get(timeout=5)
        args, _kwargs, _embed = message.decode()
        yield Delivery(job_id=args[0], task_id=message.headers["id"], task_name=message.headers["task"],
                       message=message)
        message.ack()
        consumer.close()


def stored_job(store: JobStore, number: int) -> Job:
    now = time.time()
    job = Job(id=f"job_flow_{number}", tenant="acme", task=TASK, input={"text": "Where is my new card?"},
              priority=Priority.NORMAL, route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT),
              created_at=now, updated_at=now, queued_at=now)
    store.create(job)
    return job


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def queue_length(registry: CollectorRegistry, queue: str) -> float:
    return value(registry, "smallfirst_queue_length", queue=queue)


def test_queue_depth_and_job_counters_move_as_jobs_flow_through_the_tiers(
        celery_app: Celery, job_store: JobStore, execution: JobExecution, registry: CollectorRegistry,
        queue_collector: QueueCollector) -> None:
    # given three small-tier jobs stored and published
    jobs = [stored_job(job_store, n) for n in range(3)]
    Publisher(celery_app).publish_jobs(jobs)
    assert queue_length(registry, k.QUEUE_SMALL) == 3

    # when a small worker takes the first one, and its answer fails validation
    with delivery_from(celery_app, k.QUEUE_SMALL) as small:
        ctx = execution.begin(small.job_id, Tier.SMALL, small.task_id)
        assert ctx is not None
        waiting_while_running = queue_length(registry, k.QUEUE_SMALL)
        unacked_while_running = value(registry, "smallfirst_unacked_messages")
        execution.finish(ctx, AttemptResult(
            answer={"label": "lost card"}, confidence=0.31, usage=Usage(input_tokens=12),
            verdict=Verdict(passed=False, reasons=["choice: 'lost card' is not one of the allowed labels",
                                                   "min_confidence: 0.31 is below 0.6"])))

    # then the small queue shrank while the delivery was held, and the escalation is counted and queued
    assert small.task_name == k.TASK_RUN_SMALL
    assert waiting_while_running == 2
    assert unacked_while_running == 1
    assert value(registry, "smallfirst_unacked_messages") == 0
    assert value(registry, "smallfirst_escalations_total", task=TASK, reason="choice") == 1
    assert value(registry, "smallfirst_escalations_total", task=TASK, reason="min_confidence") == 1
    assert value(registry, "smallfirst_job_duration_seconds_count", tier="small", phase=PHASE_QUEUE_WAIT) == 1
    assert value(registry, "smallfirst_job_duration_seconds_count", tier="small", phase=PHASE_RUN) == 1
    assert queue_length(registry, k.QUEUE_ESCALATION) == 1

    # when a frontier worker takes the escalation and answers it
    with delivery_from(celery_app, k.QUEUE_ESCALATION) as escalated:
        frontier_ctx = execution.begin(escalated.job_id, Tier.FRONTIER, escalated.task_id)
        assert frontier_ctx is not None
        execution.finish(frontier_ctx, AttemptResult(
            answer={"label": "lost_or_stolen_card"}, usage=Usage(input_tokens=300, output_tokens=9), cost_usd=0.0004,
            verdict=Verdict(passed=True)))

    # then the escalation queue is empty and the job ended on the frontier tier, with its cost
    assert escalated.job_id == small.job_id
    assert queue_length(registry, k.QUEUE_ESCALATION) == 0
    assert value(registry, "smallfirst_jobs_ended_total", task=TASK, tier="frontier", status="succeeded") == 1
    assert value(registry, "smallfirst_job_duration_seconds_count", tier="frontier", phase=PHASE_QUEUE_WAIT) == 1
    assert value(registry, "smallfirst_job_cost_usd_total", task=TASK, tier="frontier") == 0.0004

    # when the next small job is answered by the small tier
    with delivery_from(celery_app, k.QUEUE_SMALL) as second:
        second_ctx = execution.begin(second.job_id, Tier.SMALL, second.task_id)
        assert second_ctx is not None
        execution.finish(second_ctx, AttemptResult(
            answer={"label": "card_arrival"}, confidence=0.92, usage=Usage(input_tokens=12),
            verdict=Verdict(passed=True), estimated_frontier_cost_usd=0.0003))

    # then it ended on the small tier, saved the frontier estimate, and one job is left waiting
    assert value(registry, "smallfirst_jobs_ended_total", task=TASK, tier="small", status="succeeded") == 1
    assert value(registry, "smallfirst_savings_usd_total", task=TASK) == 0.0003
    assert value(registry, "smallfirst_escalations_total", task=TASK, reason="choice") == 1
    assert queue_length(registry, k.QUEUE_SMALL) == 1
    assert job_store.get(small.job_id).status is JobStatus.SUCCEEDED


def test_a_duplicate_delivery_of_an_ended_job_counts_nothing(
        celery_app: Celery, job_store: JobStore, execution: JobExecution, registry: CollectorRegistry,
        queue_collector: QueueCollector) -> None:
    # given a small job answered by the small tier
    job = stored_job(job_store, 7)
    publisher = Publisher(celery_app)
    publisher.publish_jobs([job])
    with delivery_from(celery_app, k.QUEUE_SMALL) as first:
        ctx = execution.begin(first.job_id, Tier.SMALL, first.task_id)
        assert ctx is not None
        execution.finish(ctx, AttemptResult(answer={"label": "card_arrival"}, confidence=0.9,
                                            usage=Usage(input_tokens=5), verdict=Verdict(passed=True)))

    # when its message is delivered again (the broker redelivers after a lost ack)
    publisher.publish_job(job)
    with delivery_from(celery_app, k.QUEUE_SMALL) as again:
        refused = execution.begin(again.job_id, Tier.SMALL, again.task_id)

    # then nothing runs and nothing is counted twice
    assert refused is None
    assert value(registry, "smallfirst_jobs_ended_total", task=TASK, tier="small", status="succeeded") == 1
    assert value(registry, "smallfirst_job_duration_seconds_count", tier="small", phase=PHASE_QUEUE_WAIT) == 1
    assert queue_length(registry, k.QUEUE_SMALL) == 0

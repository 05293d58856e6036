"""The sweeper finds every unfinished job whose message is missing: a job stored without its
publish (the publish outbox), a job past due behind a long queue, and every job after Redis
restarted on its AOF. Real Redis, real Celery publishing; the queues are read as the workers would."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.runtime import Sweeper, queue_depth
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import AsyncJobStore, JobStore
from tests.support.redis_server import RedisServer

STALE_AFTER_S = 900
OUTBOX_GRACE_S = 5.0


def make_job(tier: Tier = Tier.FRONTIER, created_at: float | None = None) -> Job:
    now = time.time() if created_at is None else created_at
    return Job(id=new_job_id(), tenant="acme", task="email_summary", input={"text": "hello"},
               route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT), created_at=now, updated_at=now,
               queued_at=now)


def store_as_the_api_does(redis_url: str, jobs: list[Job]) -> None:
    """The API's accept transaction (record, indexes, outbox entry), with no publish after it."""
    async def store() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await AsyncJobStore(client, retention_s=3600, stale_after_s=STALE_AFTER_S).create_many(jobs)
        await client.aclose()  # type: ignore[attr-defined]

    asyncio.run(store())


def queued_job_ids(client: redis.Redis, queue: str) -> list[str]:
    """The job ids of the messages waiting in `queue` (a Celery message's args, as a worker reads them)."""
    ids: list[str] = []
    for key in k.priority_list_keys(queue):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            ids.append(args[0])
    return ids


@pytest.fixture
def sweeper_parts(redis_url: str, catalog_path: Path) -> Iterator[tuple[Sweeper, redis.Redis]]:
    client = redis.Redis.from_url(redis_url)
    app = make_celery(CoreSettings.model_validate({"redis_url": redis_url, "catalog_path": catalog_path}))
    store = JobStore(client, retention_s=3600, stale_after_s=STALE_AFTER_S)
    yield Sweeper(store, Publisher(app), outbox_grace_s=OUTBOX_GRACE_S), client
    app.close()
    client.close()


def test_a_job_stored_without_its_publish_is_published_once_its_outbox_entry_is_past_the_grace(
        redis_url: str, sweeper_parts: tuple[Sweeper, redis.Redis]) -> None:
    # given: the API stored a job and then crashed before publishing its message
    sweeper, client = sweeper_parts
    job = make_job()
    store_as_the_api_does(redis_url, [job])
    assert queue_depth(client, k.QUEUE_FRONTIER) == 0

    # when: a sweep within the grace, then one after it
    early = sweeper.sweep_once(now=job.created_at + OUTBOX_GRACE_S / 2)
    late = sweeper.sweep_once(now=job.created_at + OUTBOX_GRACE_S + 1)

    # then: published exactly once, the outbox emptied
    assert early["unpublished"] == 0
    assert late["unpublished"] == 1
    assert queued_job_ids(client, k.QUEUE_FRONTIER) == [job.id]
    assert client.zcard(k.PUBLISH_OUTBOX_KEY) == 0


def test_an_outbox_entry_of_a_job_already_running_is_dropped_without_a_duplicate(
        redis_url: str, sweeper_parts: tuple[Sweeper, redis.Redis]) -> None:
    # given: a job whose message was delivered (it runs) but whose outbox entry the API never removed
    sweeper, client = sweeper_parts
    job = make_job()
    store_as_the_api_does(redis_url, [job])
    sweeper.store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.FRONTIER, model="m", worker="w", task_id="t1", now=time.time(), lease_s=600))

    # when
    counts = sweeper.sweep_once(now=job.created_at + OUTBOX_GRACE_S + 1)

    # then
    assert counts["unpublished"] == 0
    assert queue_depth(client, k.QUEUE_FRONTIER) == 0
    assert client.zcard(k.PUBLISH_OUTBOX_KEY) == 0


def test_a_past_due_queued_job_is_republished_even_behind_a_long_queue(
        redis_url: str, sweeper_parts: tuple[Sweeper, redis.Redis]) -> None:
    # given: 200 other messages waiting, and a job (outbox already confirmed) whose message was lost
    sweeper, client = sweeper_parts
    for _ in range(200):
        sweeper.publisher.app.send_task(k.TASK_RUN_FRONTIER, args=["someone_else"], queue=k.QUEUE_FRONTIER,
                                        priority=k.PRIORITY_NORMAL)
    job = make_job()
    store_as_the_api_does(redis_url, [job])
    sweeper.store.published([job.id])

    # when: a sweep before its progress deadline, then one after it
    before = sweeper.sweep_once(now=job.created_at + 60)
    after = sweeper.sweep_once(now=job.created_at + STALE_AFTER_S + 1)

    # then: re-published by the second sweep only, although the queue is far from empty
    assert before["republished"] == 0
    assert after["republished"] == 1
    assert queued_job_ids(client, k.QUEUE_FRONTIER).count(job.id) == 1


def test_an_escalated_job_past_due_is_republished_to_the_escalation_queue(
        redis_url: str, sweeper_parts: tuple[Sweeper, redis.Redis]) -> None:
    # given: a job escalated by a small attempt, whose escalation message was lost; others are queued there
    sweeper, client = sweeper_parts
    sweeper.publisher.app.send_task(k.TASK_RUN_FRONTIER, args=["someone_else"], queue=k.QUEUE_ESCALATION,
                                    priority=k.PRIORITY_HIGH)
    job = make_job(tier=Tier.SMALL)
    store_as_the_api_does(redis_url, [job])
    sweeper.store.published([job.id])
    sweeper.store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.SMALL, model="m", worker="w", task_id="t1", now=time.time(), lease_s=600))
    _, escalated = sweeper.store.transition(job.id, lambda j: lifecycle.escalate(j, lifecycle.AttemptEnd(
        attempt_number=1, task_id="t1", now=time.time()), reasons=["schema"]))
    sweeper.store.published([job.id])  # the worker confirmed a publish that the broker then lost

    # when
    counts = sweeper.sweep_once(now=escalated.updated_at + STALE_AFTER_S + 1)

    # then
    assert counts["republished"] == 1
    assert queued_job_ids(client, k.QUEUE_ESCALATION).count(job.id) == 1


def test_after_redis_restarts_on_its_aof_every_unfinished_job_is_republished_at_once(
        tmp_path: Path, catalog_path: Path) -> None:
    # given: its own Redis, a sweep that has seen it, and a job whose message is gone (as if the
    # killed server had lost it): not yet due, outbox confirmed
    server = RedisServer(tmp_path / "redis").start()
    try:
        client = server.client(socket_timeout_s=5)
        app = make_celery(CoreSettings.model_validate({"redis_url": server.url, "catalog_path": catalog_path}))
        sweeper = Sweeper(JobStore(client, retention_s=3600, stale_after_s=STALE_AFTER_S), Publisher(app),
                          outbox_grace_s=OUTBOX_GRACE_S)
        job = make_job()
        store_as_the_api_does(server.url, [job])
        sweeper.store.published([job.id])
        assert sweeper.sweep_once()["after_restart"] == 0
        client.close()

        # when: Redis is SIGKILLed and restarted on its AOF, and the sweeper runs again
        server.kill()
        server.start()
        client = server.client(socket_timeout_s=5)
        sweeper.store.redis = client
        first = sweeper.sweep_once()
        second = sweeper.sweep_once()

        # then: the job survived the crash and was re-published by the first sweep after it, only
        assert Job.model_validate_json(client.get(k.job_key(job.id)) or b"").id == job.id
        assert first["after_restart"] == 1
        assert second["after_restart"] == 0
        assert queued_job_ids(client, k.QUEUE_FRONTIER) == [job.id]
        app.close()
        client.close()
    finally:
        server.stop()


def test_an_escalation_whose_worker_died_before_publishing_is_published_from_the_outbox(
        redis_url: str, sweeper_parts: tuple[Sweeper, redis.Redis]) -> None:
    # given: a small attempt ended in an escalation (stored), and its worker died before publishing
    sweeper, client = sweeper_parts
    job = make_job(tier=Tier.SMALL)
    store_as_the_api_does(redis_url, [job])
    sweeper.store.published([job.id])
    sweeper.store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.SMALL, model="m", worker="w", task_id="t1", now=time.time(), lease_s=600))
    _, escalated = sweeper.store.transition(job.id, lambda j: lifecycle.escalate(j, lifecycle.AttemptEnd(
        attempt_number=1, task_id="t1", now=time.time()), reasons=["schema"]))

    # when: a sweep after the outbox grace, long before the job's progress deadline
    counts = sweeper.sweep_once(now=escalated.updated_at + OUTBOX_GRACE_S + 1)

    # then
    assert counts["unpublished"] == 1
    assert queued_job_ids(client, k.QUEUE_ESCALATION) == [job.id]
    assert client.zcard(k.PUBLISH_OUTBOX_KEY) == 0

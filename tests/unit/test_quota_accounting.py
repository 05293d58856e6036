"""Quota counters and retention in the job store, on a real Redis: bytes and jobs in flight move
with the writes that store them, bytes are released when their record expires, the tenant's job
index is trimmed, and spend is counted once per billed frontier attempt."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
import redis.asyncio as aioredis

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.budgets import PERIOD_DAY, period_id
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.common.quotas import (
    CODE_BYTES_STORED,
    FIELD_BYTES_STORED,
    FIELD_JOBS_IN_FLIGHT,
    AsyncQuotaGate,
    QuotaLimits,
    stored_bytes,
)
from smallfirst.common.store import JobStore


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, retention_s=3600, stale_after_s=900)


def make_job(number: int, text: str = "Where is my card?", created_at: float | None = None,
             retention_s: int | None = None) -> Job:
    now = created_at if created_at is not None else time.time()
    return Job(id=f"job_q_{number}", tenant="acme", task="banking77_intent", input={"text": text},
               route=RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.TASK_DEFAULT), created_at=now,
               updated_at=now, queued_at=now, retention_s=retention_s)


def usage(client: redis.Redis) -> dict[str, int]:
    return {key.decode(): int(value) for key, value in client.hgetall(k.usage_key("acme")).items()}


def answer(store: JobStore, job: Job, cost_usd: float) -> Job:
    _, running = store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.FRONTIER, model="m", worker="w", task_id="t", now=time.time(), lease_s=60))
    number = running.attempts[-1].number
    _, done = store.transition(job.id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=number, task_id="t", now=time.time(), answer={"label": "card_arrival"},
        usage=Usage(input_tokens=10, output_tokens=2), cost_usd=cost_usd, verdict=Verdict(passed=True),
        billed=True)))
    return done


def test_bytes_and_jobs_in_flight_move_with_the_writes_and_spend_is_counted_once(
        store: JobStore, client: redis.Redis) -> None:
    # given two jobs of one tenant, one with a multi-byte input
    first, second = make_job(1), make_job(2, text="ünïcödé")
    store.create(first)
    store.create(second)
    after_create = usage(client)

    # when one is answered by the frontier (and the same transition is attempted again)
    done = answer(store, first, cost_usd=0.25)
    after_end = usage(client)

    # then bytes are UTF-8 bytes of what is stored, in flight counts unended jobs, spend is billed once
    assert after_create == {FIELD_BYTES_STORED: stored_bytes(first) + stored_bytes(second), FIELD_JOBS_IN_FLIGHT: 2}
    assert stored_bytes(second) == len("ünïcödé".encode())
    assert after_end[FIELD_JOBS_IN_FLIGHT] == 1
    assert after_end[FIELD_BYTES_STORED] == stored_bytes(done) + stored_bytes(second)
    spent = client.get(k.spend_key("acme", PERIOD_DAY, period_id(PERIOD_DAY, time.time())))
    assert spent is not None
    assert float(spent) == 0.25
    assert client.ttl(k.spend_key("acme", PERIOD_DAY, period_id(PERIOD_DAY, time.time()))) > 0


def test_bytes_of_expired_records_are_released_at_the_next_admission(store: JobStore, client: redis.Redis,
                                                                     redis_url: str) -> None:
    # given a tenant at its byte limit with a job whose record lives one second
    store.create(make_job(1, text="x" * 500, retention_s=1))
    limits = QuotaLimits(max_jobs_in_flight=None, max_bytes_stored=600, submissions_per_s=None,
                         submissions_burst=None, max_input_bytes=None)

    async def admit() -> tuple[int, str]:
        async_client = aioredis.Redis.from_url(redis_url)
        try:
            admission = await AsyncQuotaGate(async_client).admit("acme", limits, [200], now=time.time(),
                                                                 partial=False)
            return admission.granted, admission.code
        finally:
            await async_client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose()

    # when a job of 200 bytes asks to be admitted before and after the record expired
    before = asyncio.run(admit())
    time.sleep(1.2)
    after = asyncio.run(admit())

    # then it is refused while the bytes are held, and admitted once they are released
    assert before == (0, CODE_BYTES_STORED)
    assert after == (1, "")
    assert usage(client)[FIELD_BYTES_STORED] == 0


def test_the_tenants_job_index_is_trimmed_of_entries_past_retention(store: JobStore, client: redis.Redis) -> None:
    # given an index entry of a job created long before the retention period
    ancient = time.time() - 3600 - k.TENANT_JOBS_INDEX_SLACK_S - 60
    store.create(make_job(1, created_at=ancient))

    # when the tenant submits a new job
    store.create(make_job(2))

    # then the old entry is gone and the index expires
    assert client.zrange(k.tenant_jobs_key("acme"), 0, -1) == [b"job_q_2"]
    assert client.ttl(k.tenant_jobs_key("acme")) > 0

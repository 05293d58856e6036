"""The job store: job records in Redis, changed only through compare-and-set transitions.

A transition reads the job under WATCH, applies a pure function from `lifecycle`, and writes the
result in one MULTI together with its side effects (the active-jobs index, the tenant's stats, the
terminal event that wakes long-polls, the webhook outbox). If anyone wrote the job in between, the
transaction aborts and the function is applied again to the fresh record. Effects that depend on
the job ending are thus applied exactly once, however often a message is delivered.

The sync `JobStore` serves the workers; `AsyncJobStore` serves the API. Both share the effect
logic in `_write_effects`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from smallfirst.common import constants as k
from smallfirst.common.jobs import Job, JobStatus, Tier
from smallfirst.common.lifecycle import TransitionRefused

Transition = Callable[[Job], Job]

# Webhook deliveries waiting to be made, scored by when they are due (the outbox the sweeper reads).
WEBHOOK_OUTBOX_KEY = k.WEBHOOK_OUTBOX_KEY


# KEYS: job keys; ARGV[1]: retention in s, ARGV[2..]: the records, in the order of KEYS.
_SET_MANY_SCRIPT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""


class JobNotFound(LookupError):
    """No job with that id (or it expired after its retention period)."""


class StoreConflict(RuntimeError):
    """A transition kept losing the compare-and-set race; something writes the job in a loop."""


class CorruptJob(RuntimeError):
    """A stored job record no longer parses; the record is kept for inspection."""


def _parse(job_id: str, raw: bytes | str | None) -> Job:
    if raw is None:
        raise JobNotFound(job_id)
    try:
        return Job.model_validate_json(raw)
    except ValidationError as exc:
        raise CorruptJob(f"job {job_id}: stored record does not parse: {exc}") from exc


def progress_deadline(job: Job, stale_after_s: float) -> float:
    """When the sweeper should look at a job that is not finished: the running attempt's lease, or
    for a job waiting in a queue, a while after it was queued."""
    attempt = job.open_attempt()
    if job.status is JobStatus.RUNNING and attempt is not None:
        return attempt.lease_expires_at
    return job.updated_at + stale_after_s


def _stats_fields(job: Job) -> dict[str, float]:
    """Counter increments for the tenant's per-task stats, taken once, when the job ends."""
    fields: dict[str, float] = {"jobs_ended": 1, f"status:{job.status.value}": 1}
    accepted = [a for a in job.attempts if a.outcome.value == "accepted"]
    if accepted:
        tier = accepted[-1].tier
        fields[f"served:{tier.value}"] = 1
        if tier is Tier.SMALL and accepted[-1].estimated_frontier_cost_usd is not None:
            estimate = accepted[-1].estimated_frontier_cost_usd
            fields["estimated_frontier_cost_usd"] = estimate
            fields["savings_usd"] = estimate - job.total_cost_usd()
    if any(a.tier is Tier.SMALL for a in job.attempts) and any(a.tier is Tier.FRONTIER for a in job.attempts):
        fields["escalated"] = 1
        for reason in job.escalation_reasons:
            fields[f"escalation_reason:{reason.split(':', 1)[0]}"] = 1
    for attempt in job.attempts:
        if attempt.billed:
            tier_field = f"cost_usd:{attempt.tier.value}"
            fields[tier_field] = fields.get(tier_field, 0) + attempt.cost_usd
            fields["cost_usd"] = fields.get("cost_usd", 0) + attempt.cost_usd
            fields["input_tokens"] = fields.get("input_tokens", 0) + attempt.usage.input_tokens
            fields["output_tokens"] = fields.get("output_tokens", 0) + attempt.usage.output_tokens
    if job.error is not None:
        fields[f"error:{job.error.code}"] = 1
    return fields


def _write_effects(pipe: Any, old: Job | None, new: Job, retention_s: int, stale_after_s: float) -> None:
    """Queue the writes of one transition on a pipeline already in MULTI (sync or asyncio)."""
    new.version = (old.version if old else 0) + 1
    pipe.set(k.job_key(new.id), new.model_dump_json(), ex=retention_s)
    if old is None:
        pipe.zadd(k.tenant_jobs_key(new.tenant), {new.id: int(new.created_at * 1000)})
        pipe.expire(k.tenant_jobs_key(new.tenant), retention_s)
        pipe.hincrby(k.stats_key(new.tenant, new.task), "jobs_submitted", 1)
        pipe.hincrby(k.stats_key(new.tenant, new.task), f"routed:{new.route.tier.value}", 1)
        pipe.sadd(k.stats_index_key(new.tenant), new.task)
    if new.status.terminal:
        pipe.zrem(k.ACTIVE_JOBS_KEY, new.id)
    else:
        pipe.zadd(k.ACTIVE_JOBS_KEY, {new.id: progress_deadline(new, stale_after_s)})
    ended_now = new.status.terminal and (old is None or not old.status.terminal)
    if ended_now:
        for field, amount in _stats_fields(new).items():
            # By type, not by value: a dollar amount of 0.0 added with HINCRBY to a field that already
            # holds "0.0004" fails the whole transaction ("hash value is not an integer").
            if isinstance(amount, int):
                pipe.hincrby(k.stats_key(new.tenant, new.task), field, amount)
            else:
                pipe.hincrbyfloat(k.stats_key(new.tenant, new.task), field, amount)
        if new.callback_url:
            pipe.zadd(WEBHOOK_OUTBOX_KEY, {new.id: new.updated_at})
        pipe.publish(k.job_events_channel(new.id), new.status.value)


class JobStore:
    """Job records for the workers (blocking Redis client)."""

    MAX_CAS_TRIES = 50

    def __init__(self, client: redis.Redis, *, retention_s: int, stale_after_s: float) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.stale_after_s = stale_after_s

    def create(self, job: Job) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            _write_effects(pipe, None, job, self.retention_s, self.stale_after_s)
            pipe.execute()

    def get(self, job_id: str) -> Job:
        return _parse(job_id, self.redis.get(k.job_key(job_id)))

    def transition(self, job_id: str, change: Transition) -> tuple[Job, Job]:
        """Apply `change` atomically; returns (before, after). Raises TransitionRefused or JobNotFound."""
        key = k.job_key(job_id)
        for _ in range(self.MAX_CAS_TRIES):
            with self.redis.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key)
                    # Under WATCH the pipeline executes at once and returns the value.
                    raw: Any = pipe.get(key)
                    old = _parse(job_id, raw)
                    new = change(old.model_copy(deep=True))
                    pipe.multi()
                    _write_effects(pipe, old, new, self.retention_s, self.stale_after_s)
                    pipe.execute()
                    return old, new
                except redis.WatchError:
                    continue
        raise StoreConflict(f"job {job_id}: gave up after {self.MAX_CAS_TRIES} compare-and-set conflicts")

    def due_jobs(self, now: float, limit: int = 100) -> list[str]:
        ids: Sequence[bytes] = self.redis.zrangebyscore(k.ACTIVE_JOBS_KEY, "-inf", now, start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def rearm(self, job_id: str, now: float) -> None:
        """Push a swept job's deadline forward so it is not re-published on every sweep."""
        self.redis.zadd(k.ACTIVE_JOBS_KEY, {job_id: now + self.stale_after_s}, xx=True)


class AsyncJobStore:
    """Job records for the API (asyncio Redis client)."""

    MAX_CAS_TRIES = 50

    def __init__(self, client: aioredis.Redis, *, retention_s: int, stale_after_s: float) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.stale_after_s = stale_after_s

    async def create(self, job: Job) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            _write_effects(pipe, None, job, self.retention_s, self.stale_after_s)
            await pipe.execute()

    async def create_many(self, jobs: Sequence[Job]) -> None:
        """Store new jobs in one transaction: all of them or none (an API batch).

        The same writes as `create` for each job, except that they are merged: one script sets
        every record, one command per index and counter (a handful of commands for 1000 jobs,
        instead of ~7000 that each cost a reply to parse).
        """
        if not jobs:
            return
        if any(job.status.terminal for job in jobs):
            raise ValueError("create_many stores new, unfinished jobs only")
        keys: list[str] = []
        records: list[str] = []
        index: dict[str, dict[str | bytes, bytes | float | int | str]] = {}
        counters: dict[tuple[str, str], dict[str, int]] = {}
        active: dict[str | bytes, bytes | float | int | str] = {}
        async with self.redis.pipeline(transaction=True) as pipe:
            for job in jobs:
                job.version = 1
                keys.append(k.job_key(job.id))
                records.append(job.model_dump_json())
                index.setdefault(job.tenant, {})[job.id] = int(job.created_at * 1000)
                fields = counters.setdefault((job.tenant, job.task), {})
                for field in ("jobs_submitted", f"routed:{job.route.tier.value}"):
                    fields[field] = fields.get(field, 0) + 1
                active[job.id] = progress_deadline(job, self.stale_after_s)
            pipe.eval(_SET_MANY_SCRIPT, len(keys), *keys, self.retention_s, *records)
            for tenant, members in index.items():
                pipe.zadd(k.tenant_jobs_key(tenant), members)
                pipe.expire(k.tenant_jobs_key(tenant), self.retention_s)
            for (tenant, task), fields in counters.items():
                for field, amount in fields.items():
                    pipe.hincrby(k.stats_key(tenant, task), field, amount)
                pipe.sadd(k.stats_index_key(tenant), task)
            pipe.zadd(k.ACTIVE_JOBS_KEY, active)
            await pipe.execute()

    async def get(self, job_id: str) -> Job:
        return _parse(job_id, await self.redis.get(k.job_key(job_id)))

    async def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs that still exist, in the order asked; expired ids are left out."""
        if not job_ids:
            return []
        raws = await self.redis.mget([k.job_key(i) for i in job_ids])
        return [_parse(i, raw) for i, raw in zip(job_ids, raws, strict=True) if raw is not None]

    async def transition(self, job_id: str, change: Transition) -> tuple[Job, Job]:
        key = k.job_key(job_id)
        for _ in range(self.MAX_CAS_TRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    old = _parse(job_id, await pipe.get(key))
                    new = change(old.model_copy(deep=True))
                    pipe.multi()
                    _write_effects(pipe, old, new, self.retention_s, self.stale_after_s)
                    await pipe.execute()
                    return old, new
                except redis.WatchError:
                    continue
        raise StoreConflict(f"job {job_id}: gave up after {self.MAX_CAS_TRIES} compare-and-set conflicts")


def now_s() -> float:
    return time.time()


__all__ = [
    "AsyncJobStore",
    "CorruptJob",
    "JobNotFound",
    "JobStore",
    "StoreConflict",
    "TransitionRefused",
    "now_s",
    "progress_deadline",
]

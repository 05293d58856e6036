"""The job store: job records in Redis, changed only through compare-and-set transitions.

A transition reads the job under WATCH, applies a pure function from `lifecycle`, and writes the
result in one MULTI together with its side effects (the active-jobs index, the tenant's stats, the
terminal event that wakes long-polls, the webhook outbox, the tenant's dead letters). If anyone
wrote the job in between, the transaction aborts and the function is applied again to the fresh
record. Effects that depend on the job ending are thus applied exactly once, however often a
message is delivered.

The sync `JobStore` serves the workers; `AsyncJobStore` serves the API. Both share the effect
logic in `_write_effects`.

Accepting a job is one transaction too: the record, its tenant-index entry, its active-jobs entry
(what the sweeper scans) and a publish-outbox entry (`PUBLISH_OUTBOX_KEY`) are written in one
MULTI/EXEC. The API answers 202 once that transaction is acknowledged; it then publishes the
job's message and removes the outbox entry (`published`). A worker's transition into `queued` (a
retry) or `escalated` writes an outbox entry the same way, removed once the worker has published
the message that follows. The sweeper re-publishes any outbox
entry older than a few seconds. So a crash at any instant leaves either no job at all (the
transaction did not apply: the client got an error and retries with its idempotency key) or a job
with an outbox entry or a message, which the workers or the sweeper finish.

What left jobs stuck before: the record and its indexes were already written together, but the
message was a separate write (kombu's own pipeline, after the transaction), and the only net under
it was the active-jobs entry, due `stale_after_s` (15 min) after queuing and then re-published only
if the job's queue was empty. A job stored just before Redis was killed, whose message was not
written (the publish failed while Redis was down, and the API answered 202 since the job was
stored), or whose message a worker had popped without kombu's unacked bookkeeping reaching the AOF,
sat `queued` (or `escalated`, the same gap on the escalation hop) with no message; under a steady
stream the queue is never empty, so nothing re-published it. Now the outbox covers the first gap
within seconds, the sweeper re-publishes every past-due job whatever the queue length, and after a
Redis restart it re-publishes every unfinished job at once (see `runtime.Sweeper`).

The workers' store makes the compare-and-set one script instead of
WATCH / GET / MULTI...EXEC: the record is read (GET), the change applied, and one EVALSHA writes
the new record and every effect if and only if the stored record is still the one read, byte for
byte, else answers the current record to apply the change to again. A worker that knows the record
it last wrote (a job's attempt, begun then finished) skips the read: one round trip per transition
instead of three. Redis runs a script atomically, as it runs a MULTI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from smallfirst.common import constants as k
from smallfirst.common.budgets import add_spend, frontier_spend
from smallfirst.common.deadletters import queue_entry_writes
from smallfirst.common.errors import InfrastructureError, NotFound, SmallfirstError
from smallfirst.common.events import stats_increments, transition_events
from smallfirst.common.jobs import Job, JobStatus
from smallfirst.common.lifecycle import TransitionRefused
from smallfirst.common.quotas import account_job_write, account_new_jobs, account_record

Transition = Callable[[Job], Job]
# Writes of the caller's own, queued on the transition's MULTI (pipeline, before, after), so that
# they happen if and only if the job's compare-and-set does (e.g. "this batch result is handled").
Effects = Callable[[Any, Job, Job], None]

@dataclass(frozen=True)
class RecordWrite:
    """A SET that `AsyncJobStore.create_many` makes in the jobs' own transaction (a request's
    idempotency record). With `tenant`, its bytes count against that tenant's stored-bytes quota
    under `quota_member` (quotas.account_record), in the same transaction."""

    key: str
    value: str
    ttl_s: int
    tenant: str | None = None
    quota_member: str | None = None


# Webhook deliveries waiting to be made, scored by when they are due (the outbox the sweeper reads).
WEBHOOK_OUTBOX_KEY = k.WEBHOOK_OUTBOX_KEY


# KEYS: job keys; ARGV[1]: retention in s, ARGV[2..]: the records, in the order of KEYS.
_SET_MANY_SCRIPT = """
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
end
return #KEYS
"""


# Compare-and-set of one job record with its effects. KEYS[1]: the job's key. ARGV[1]: the record
# read (the expected value); then the effect commands, each as its argument count and arguments.
# Answers {1} when written, {0, current} when the record changed meanwhile, {-1} when it is gone.
# The effects' keys are not declared in KEYS: Redis Cluster is not supported (README, Redis).
_CAS_SCRIPT = """
local current = redis.call('GET', KEYS[1])
if not current then return {-1} end
if current ~= ARGV[1] then return {0, current} end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return {1}
"""


class _Commands:
    """Stands in for a pipeline in `_write_effects`: records its commands as argument lists."""

    def __init__(self) -> None:
        self.commands: list[list[Any]] = []

    def _add(self, *args: Any) -> None:
        self.commands.append(list(args))

    def set(self, key: str, value: str, ex: int) -> None:
        self._add("SET", key, value, "EX", ex)

    def zadd(self, key: str, mapping: dict[str, float], xx: bool = False, nx: bool = False) -> None:
        args: list[Any] = ["ZADD", key, *(["XX"] if xx else []), *(["NX"] if nx else [])]
        for member, score in mapping.items():
            args += [repr(float(score)), member]
        self._add(*args)

    def zrem(self, key: str, member: str) -> None:
        self._add("ZREM", key, member)

    def zremrangebyscore(self, key: str, low: float | str, high: float | str) -> None:
        self._add("ZREMRANGEBYSCORE", key, low if isinstance(low, str) else repr(float(low)),
                  high if isinstance(high, str) else repr(float(high)))

    def expire(self, key: str, seconds: int) -> None:
        self._add("EXPIRE", key, seconds)

    def sadd(self, key: str, member: str) -> None:
        self._add("SADD", key, member)

    def hincrby(self, key: str, field: str, amount: int) -> None:
        self._add("HINCRBY", key, field, amount)

    def hincrbyfloat(self, key: str, field: str, amount: float) -> None:
        self._add("HINCRBYFLOAT", key, field, repr(float(amount)))

    def incrbyfloat(self, key: str, amount: float) -> None:
        self._add("INCRBYFLOAT", key, repr(float(amount)))

    def publish(self, channel: str, message: str) -> None:
        self._add("PUBLISH", channel, message)

    def hset(self, key: str, field: str, value: str) -> None:
        self._add("HSET", key, field, value)

    def hdel(self, key: str, field: str) -> None:
        self._add("HDEL", key, field)

    def delete(self, key: str) -> None:
        self._add("DEL", key)

    def argv(self) -> list[Any]:
        flat: list[Any] = []
        for command in self.commands:
            flat += [len(command), *command]
        return flat


class JobNotFound(NotFound):
    """No job with that id (or it expired after its retention period)."""

    code = "job_not_found"


class StoreConflict(InfrastructureError):
    """A transition kept losing the compare-and-set race; something writes the job in a loop."""

    code = "store_conflict"


class CorruptJob(SmallfirstError):
    """A stored job record no longer parses; the record is kept for inspection."""

    code = "corrupt_job"


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
    return max(job.updated_at, job.retry_at or 0.0) + stale_after_s


# Statuses a job enters only together with a message still to be published (its first delivery, a
# retry, the escalation hop).
_AWAITING_MESSAGE = frozenset({JobStatus.QUEUED, JobStatus.ESCALATED})


def _add_stats(pipe: Any, tenant: str, task: str, fields: dict[str, float | int]) -> None:
    for field, amount in fields.items():
        # By type, not by value: a dollar amount of 0.0 added with HINCRBY to a field that already
        # holds "0.0004" fails the whole transaction ("hash value is not an integer").
        if isinstance(amount, int):
            pipe.hincrby(k.stats_key(tenant, task), field, amount)
        else:
            pipe.hincrbyfloat(k.stats_key(tenant, task), field, amount)


# Submission counters stay out of the time series: a batch's submissions are written by
# `create_many` without them, so the series hold outcomes only (when a job ended, escalated, cost).
_SERIES_SKIPPED_PREFIXES = ("jobs_submitted", "routed:", "input_tokens", "output_tokens")
_SERIES_BUCKETS = ((k.SERIES_MINUTE_S, k.SERIES_MINUTE_TTL_S), (k.SERIES_HOUR_S, k.SERIES_HOUR_TTL_S))


def series_fields(task: str, increments: dict[str, float | int]) -> dict[str, float | int]:
    """The time-series fields (`<task>/<field>`) that a transition's stats increments move."""
    return {f"{task}/{name}": amount for name, amount in increments.items()
            if not name.startswith(_SERIES_SKIPPED_PREFIXES)}


def _add_series(pipe: Any, tenant: str, task: str, increments: dict[str, float | int], at: float) -> None:
    fields = series_fields(task, increments)
    if not fields:
        return
    for bucket_s, ttl_s in _SERIES_BUCKETS:
        key = k.stats_series_key(tenant, bucket_s, int(at // bucket_s) * bucket_s)
        for field, amount in fields.items():
            if isinstance(amount, int):
                pipe.hincrby(key, field, amount)
            else:
                pipe.hincrbyfloat(key, field, amount)
        pipe.expire(key, ttl_s)


def _write_effects(pipe: Any, old: Job | None, new: Job, retention_s: int, stale_after_s: float) -> None:
    """Queue the writes of one transition on a pipeline already in MULTI (sync or asyncio)."""
    new.version = (old.version if old else 0) + 1
    retention_s = new.retention_s or retention_s
    pipe.set(k.job_key(new.id), new.model_dump_json(), ex=retention_s)
    # The tenant's byte and in-flight counters, in the transaction that writes (quotas.py).
    account_job_write(pipe, old, new, time.time() + retention_s)
    if new.status in _AWAITING_MESSAGE and (old is None or old.status is not new.status):
        # The message that follows this write is not written yet: until its publisher confirms
        # it (`published`), the sweeper knows the job may need one.
        pipe.zadd(k.PUBLISH_OUTBOX_KEY, {new.id: new.updated_at})
    if old is None:
        pipe.zadd(k.tenant_jobs_key(new.tenant), {new.id: int(new.created_at * 1000)})
        pipe.zremrangebyscore(k.tenant_jobs_key(new.tenant), "-inf", k.tenant_jobs_trim_score(new.created_at,
                                                                                            retention_s))
        pipe.expire(k.tenant_jobs_key(new.tenant), retention_s)
        pipe.sadd(k.stats_index_key(new.tenant), new.task)
    events = transition_events(old, new)
    increments = stats_increments(events)
    _add_stats(pipe, new.tenant, new.task, increments)
    _add_series(pipe, new.tenant, new.task, increments, new.updated_at)
    # The tenant's frontier budget counters, in the transaction that bills (budgets.py).
    add_spend(pipe, new.tenant, frontier_spend(events), new.updated_at)
    if new.status.terminal:
        pipe.zrem(k.ACTIVE_JOBS_KEY, new.id)
    else:
        pipe.zadd(k.ACTIVE_JOBS_KEY, {new.id: progress_deadline(new, stale_after_s)})
    # A failure the outcome function dead-lettered enters the dead letters; a replay leaves them.
    queue_entry_writes(pipe, old, new, retention_s)
    if old is not None and old.status.terminal and not new.status.terminal:
        # A replayed job runs again: the end of its new run is a new callback, with tries of its own.
        pipe.delete(k.webhook_delivery_key(new.id))
    ended_now = new.status.terminal and (old is None or not old.status.terminal)
    if ended_now:
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
        # EVALSHA, loading the script again after a Redis restart (NOSCRIPT).
        self._cas = client.register_script(_CAS_SCRIPT)

    def create(self, job: Job) -> None:
        with self.redis.pipeline(transaction=True) as pipe:
            _write_effects(pipe, None, job, self.retention_s, self.stale_after_s)
            pipe.execute()

    def get(self, job_id: str) -> Job:
        return _parse(job_id, self.redis.get(k.job_key(job_id)))

    def transition(self, job_id: str, change: Transition, *, expected: Job | None = None,
                   effects: Effects | None = None) -> tuple[Job, Job]:
        """Apply `change` atomically, with `effects` in the same transaction; returns (before, after).
        Raises TransitionRefused or JobNotFound.

        `expected`: the record as this process last wrote or read it (e.g. the `after` of the
        transition that began an attempt). The change is applied to it without reading the job
        first; if the job changed meanwhile, to the current record, as always. `effects` queue
        their writes on the recorder the script runs (the pipeline's methods `_Commands` has).
        """
        key = k.job_key(job_id)
        raw: bytes | str | None = expected.model_dump_json() if expected is not None else None
        for _ in range(self.MAX_CAS_TRIES):
            if raw is None:
                raw = self.redis.get(key)
            old = _parse(job_id, raw)
            new = change(old.model_copy(deep=True))
            commands = _Commands()
            _write_effects(commands, old, new, self.retention_s, self.stale_after_s)
            if effects is not None:
                effects(commands, old, new)
            answer: Any = self._cas(keys=[key], args=[raw, *commands.argv()])
            if int(answer[0]) == 1:
                return old, new
            if int(answer[0]) < 0:
                raise JobNotFound(job_id)
            raw = answer[1]
        raise StoreConflict(f"job {job_id}: gave up after {self.MAX_CAS_TRIES} compare-and-set conflicts")

    def published(self, job_ids: Sequence[str]) -> None:
        """The messages that followed these jobs' last transitions are on their queues: drop their
        outbox entries."""
        if job_ids:
            self.redis.zrem(k.PUBLISH_OUTBOX_KEY, *job_ids)

    def unpublished(self, stored_before: float, limit: int = 500) -> list[str]:
        """Jobs whose transition before `stored_before` may never have been followed by its message."""
        ids: Sequence[bytes] = self.redis.zrangebyscore(k.PUBLISH_OUTBOX_KEY, "-inf", stored_before,
                                                        start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def active_jobs(self, chunk: int = 500) -> Iterator[str]:
        """Every unfinished job's id (ZSCAN: each job present for the whole scan comes at least once)."""
        for member, _ in self.redis.zscan_iter(k.ACTIVE_JOBS_KEY, count=chunk):
            yield member.decode() if isinstance(member, bytes) else str(member)

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

    async def create_many(self, jobs: Sequence[Job], also_set: Sequence[RecordWrite] = ()) -> None:
        """Store new jobs in one transaction: all of them or none (an API batch). `also_set`:
        records written (and counted) in the same transaction (the requests' idempotency records).

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
        counters: dict[tuple[str, str], dict[str, float | int]] = {}
        active: dict[str | bytes, bytes | float | int | str] = {}
        async with self.redis.pipeline(transaction=True) as pipe:
            for job in jobs:
                job.version = 1
                keys.append(k.job_key(job.id))
                records.append(job.model_dump_json())
                index.setdefault(job.tenant, {})[job.id] = int(job.created_at * 1000)
                fields = counters.setdefault((job.tenant, job.task), {})
                for field, amount in stats_increments(transition_events(None, job)).items():
                    fields[field] = fields.get(field, 0) + amount
                active[job.id] = progress_deadline(job, self.stale_after_s)
            # One script per retention period among the jobs (one, unless tenants' retentions differ).
            ttls = [job.retention_s or self.retention_s for job in jobs]
            for ttl in sorted(set(ttls)):
                chosen = [i for i, t in enumerate(ttls) if t == ttl]
                pipe.eval(_SET_MANY_SCRIPT, len(chosen), *[keys[i] for i in chosen], ttl,
                          *[records[i] for i in chosen])
            now = time.time()
            account_new_jobs(pipe, list(jobs), {job.id: now + ttl for job, ttl in zip(jobs, ttls, strict=True)})
            tenant_ttl: dict[str, int] = {}
            for job, ttl in zip(jobs, ttls, strict=True):
                tenant_ttl[job.tenant] = max(ttl, tenant_ttl.get(job.tenant, 0))
            for tenant, members in index.items():
                pipe.zadd(k.tenant_jobs_key(tenant), members)
                pipe.zremrangebyscore(k.tenant_jobs_key(tenant), "-inf",
                                      k.tenant_jobs_trim_score(now, tenant_ttl[tenant]))
                pipe.expire(k.tenant_jobs_key(tenant), tenant_ttl[tenant])
            for (tenant, task), fields in counters.items():
                _add_stats(pipe, tenant, task, fields)
                pipe.sadd(k.stats_index_key(tenant), task)
            pipe.zadd(k.ACTIVE_JOBS_KEY, active)
            pipe.zadd(k.PUBLISH_OUTBOX_KEY, {job.id: job.created_at for job in jobs})
            for write in also_set:
                pipe.set(write.key, write.value, ex=write.ttl_s)
                if write.tenant is not None:
                    account_record(pipe, write.tenant, write.quota_member or write.key,
                                   len(write.value.encode("utf-8")), now + write.ttl_s)
            await pipe.execute()

    async def published(self, job_ids: Sequence[str]) -> None:
        """As `JobStore.published`."""
        if job_ids:
            await self.redis.zrem(k.PUBLISH_OUTBOX_KEY, *job_ids)

    async def get(self, job_id: str) -> Job:
        return _parse(job_id, await self.redis.get(k.job_key(job_id)))

    async def get_many(self, job_ids: Sequence[str]) -> list[Job]:
        """The jobs that still exist, in the order asked; expired ids are left out."""
        if not job_ids:
            return []
        raws = await self.redis.mget([k.job_key(i) for i in job_ids])
        return [_parse(i, raw) for i, raw in zip(job_ids, raws, strict=True) if raw is not None]

    async def transition(self, job_id: str, change: Transition, effects: Effects | None = None) -> tuple[Job, Job]:
        key = k.job_key(job_id)
        for _ in range(self.MAX_CAS_TRIES):
            async with self.redis.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    old = _parse(job_id, await pipe.get(key))
                    new = change(old.model_copy(deep=True))
                    pipe.multi()
                    _write_effects(pipe, old, new, self.retention_s, self.stale_after_s)
                    if effects is not None:
                        effects(pipe, old, new)
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
    "Effects",
    "JobNotFound",
    "JobStore",
    "RecordWrite",
    "StoreConflict",
    "TransitionRefused",
    "now_s",
    "progress_deadline",
]

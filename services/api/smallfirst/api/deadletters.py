"""The tenant's dead letters over HTTP: list them, replay one job, replay many by reason and time.

The entries are written and removed by the job store in the same transaction as the failure and
the replay (`smallfirst.common.deadletters`); this module only reads them and asks for replays. A
replay is the `lifecycle.replay` transition (compare-and-set, so two replays of one entry make one
new run), followed by publishing the job to the tier it waits for. A job whose message is lost
after the replay is published by the sweeper, as any queued job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from smallfirst.api.errors import ApiError
from smallfirst.api.listing import InvalidCursor, decode_cursor, encode_cursor
from smallfirst.api.metrics import ApiMetrics
from smallfirst.api.publishing import PublishError, PublishPump
from smallfirst.api.settings import ApiSettings
from smallfirst.common import constants as k
from smallfirst.common import lifecycle, telemetry
from smallfirst.common.deadletters import DeadLetter, score_ms
from smallfirst.common.jobs import Job, JobStatus
from smallfirst.common.store import AsyncJobStore, JobNotFound
from smallfirst.common.tenants import Tenant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetterQuery:
    limit: int
    cursor: str | None = None
    reason: str | None = None
    failed_after: float | None = None
    failed_before: float | None = None


@dataclass(frozen=True)
class DeadLetterPage:
    entries: list[DeadLetter]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True)
class Replay:
    job: Job
    # False: the job was not dead-lettered any more because this entry was already replayed; the
    # job is answered as it is, and no second run starts.
    replayed: bool


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeadLetterService:
    def __init__(self, settings: ApiSettings, redis: aioredis.Redis, store: AsyncJobStore, pump: PublishPump,
                 metrics: ApiMetrics) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store
        self.pump = pump
        self.metrics = metrics

    async def list_entries(self, tenant: Tenant, query: DeadLetterQuery) -> DeadLetterPage:
        """The tenant's entries, newest first; filters by reason and by when the job failed."""
        upper = "+inf" if query.failed_before is None else f"({score_ms(query.failed_before)}"
        lower = "-inf" if query.failed_after is None else str(score_ms(query.failed_after))
        after: tuple[int, str] | None = None
        if query.cursor is not None:
            try:
                after = decode_cursor(query.cursor)
            except InvalidCursor:
                # As for the job list: 400, and the cursor itself is not echoed.
                raise ApiError(400, "invalid_cursor", "cursor is not one this API returned; use next_cursor "
                               "of the previous page as it was") from None
        key = k.dead_letters_key(tenant.id)
        if after is not None and (query.failed_before is None or after[0] < score_ms(query.failed_before)):
            upper = str(after[0])  # inclusive: the rest of the cursor's millisecond, filtered below
        found: list[tuple[DeadLetter, tuple[int, str]]] = []
        offset = 0
        chunk = max(100, 2 * (query.limit + 1))
        while len(found) <= query.limit:
            rows = await self.redis.zrevrangebyscore(key, upper, lower, start=offset, num=chunk, withscores=True)
            if not rows:
                break
            offset += len(rows)
            positions = [(int(score), _text(member)) for member, score in rows]
            if after is not None:
                positions = [p for p in positions if p[0] < after[0] or (p[0] == after[0] and p[1] < after[1])]
            raws = await self.redis.hmget(k.dead_letter_entries_key(tenant.id), [p[1] for p in positions]) \
                if positions else []
            for position, raw in zip(positions, raws, strict=True):
                if raw is None:
                    continue
                entry = DeadLetter.model_validate_json(raw)
                if query.reason is None or entry.reason == query.reason:
                    found.append((entry, position))
            if len(rows) < chunk:
                break
        if len(found) > query.limit:
            page = found[:query.limit]
            return DeadLetterPage([e for e, _ in page], True, encode_cursor(page[-1][1]))
        return DeadLetterPage([e for e, _ in found], False, None)

    async def replay(self, tenant: Tenant, job_id: str, deadline_s: float | None = None) -> Replay:
        """A new run of the dead-lettered job `job_id`; a repeat for the same entry changes nothing."""
        job = await self._owned(tenant, job_id)
        if job.status is not JobStatus.FAILED or job.dead_letter is None:
            if job.replays > 0:
                return Replay(job, replayed=False)
            raise ApiError(409, "job_not_dead_lettered",
                           f"job {job_id} is {job.status.value} and not in the dead letters", {"job": job.public()})
        now = time.time()
        run_s = deadline_s or self._deadline_s(job)
        try:
            before, replayed = await self.store.transition(
                job_id, lambda j: lifecycle.replay(j, now=now, deadline_s=run_s))
        except lifecycle.TransitionRefused:
            # Another replay of this entry won the compare-and-set: answer the job as it now is.
            return Replay(await self._owned(tenant, job_id), replayed=False)
        except JobNotFound:
            raise _not_found(job_id) from None
        self.metrics.job_changed(before, replayed)
        telemetry.annotate_job(replayed)
        try:
            await self.pump.publish([replayed])
        except PublishError as exc:
            log.warning("job %s replayed but not published (%s); the sweeper will publish it", job_id, exc)
        return Replay(replayed, replayed=True)

    async def replay_many(self, tenant: Tenant, query: DeadLetterQuery,
                          deadline_s: float | None = None) -> tuple[list[str], list[str], bool]:
        """Replay the newest `query.limit` matching entries; (replayed, skipped, more left)."""
        page = await self.list_entries(tenant, query)
        replayed: list[str] = []
        skipped: list[str] = []
        for entry in page.entries:
            if entry.job_id is None:
                continue
            try:
                outcome = await self.replay(tenant, entry.job_id, deadline_s)
            except ApiError as exc:
                if exc.status not in (404, 409):
                    raise
                skipped.append(entry.job_id)
                continue
            (replayed if outcome.replayed else skipped).append(entry.job_id)
        return replayed, skipped, page.has_more

    def _deadline_s(self, job: Job) -> float:
        if job.deadline_at is not None:
            return max(1.0, job.deadline_at - job.created_at)
        return self.settings.default_deadline_s(job.priority)

    async def _owned(self, tenant: Tenant, job_id: str) -> Job:
        try:
            job = await self.store.get(job_id)
        except JobNotFound:
            raise _not_found(job_id) from None
        if job.tenant != tenant.id:
            raise _not_found(job_id)
        return job


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id!r}", {"job_id": job_id})

"""What the API does, apart from HTTP: the routes only parse and delegate to `JobService`.

Submission order: judge the request (task, input, route, callback URL), take quota, store the job,
then publish its message. A job stored but not yet published is re-published by the sweeper, so a
crash between the two loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import redis.asyncio as aioredis
from pydantic import ValidationError

from smallfirst.api.commit import GroupCommitter
from smallfirst.api.errors import ApiError, validation_error
from smallfirst.api.events import JobEventHub
from smallfirst.api.listing import InvalidCursor, JobIndex, Position, decode_cursor, encode_cursor
from smallfirst.api.metrics import ApiMetrics
from smallfirst.api.models import BatchRequest, JobRequest, StatsResponse
from smallfirst.api.publishing import PublishError, PublishPump
from smallfirst.api.quota import QuotaLimiter, quota_error
from smallfirst.api.settings import ApiSettings
from smallfirst.api.stats import StatsReader
from smallfirst.common import constants as k
from smallfirst.common import lifecycle, telemetry
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.jobs import Job, JobStatus, Tier, new_job_id, new_job_ids
from smallfirst.common.routing import RouteRequest, RoutingConflict, decide_route, is_local_only
from smallfirst.common.store import AsyncJobStore, JobNotFound, TransitionRefused
from smallfirst.common.tenants import Tenant
from smallfirst.common.webhooks import CallbackUrlRefused, check_callback_url

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListQuery:
    limit: int
    cursor: str | None = None
    status: JobStatus | None = None
    task: str | None = None
    tier: Tier | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None

    @property
    def filtered(self) -> bool:
        return self.status is not None or self.task is not None or self.tier is not None


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    has_more: bool
    next_cursor: str | None


@dataclass(frozen=True)
class BatchOutcome:
    accepted: int
    results: list[dict[str, Any]]


def job_not_found(job_id: str) -> ApiError:
    return ApiError(404, "job_not_found", f"no job {job_id!r}", {"job_id": job_id})


def _item_error(index: int, error: ApiError) -> dict[str, Any]:
    return {"index": index, "status": error.status, "job": None, "error": error.body()["error"]}


def _epoch_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class JobService:
    def __init__(self, *, settings: ApiSettings, catalog: Catalog, redis: aioredis.Redis, store: AsyncJobStore,
                 committer: GroupCommitter, pump: PublishPump, quota: QuotaLimiter, hub: JobEventHub,
                 stats: StatsReader, metrics: ApiMetrics) -> None:
        self.settings = settings
        self.catalog = catalog
        self.redis = redis
        self.store = store
        self.index = JobIndex(redis)
        self.committer = committer
        self.pump = pump
        self.quota = quota
        self.hub = hub
        self.stats_reader = stats
        self.metrics = metrics

    # ---- tasks ------------------------------------------------------------------------------------
    def tasks(self) -> list[Task]:
        return self.catalog.tasks()

    def task(self, name: str) -> Task:
        task = self.catalog.get(name)
        if task is None:
            raise ApiError(404, "unknown_task", f"no task named {name!r}",
                           {"task": name, "known_tasks": [t.name for t in self.catalog.tasks()]})
        return task

    # ---- submission ---------------------------------------------------------------------------
    def build_job(self, tenant: Tenant, request: JobRequest, now: float, job_id: str | None = None) -> Job:
        """The job `request` asks for, routed; ApiError if the request cannot be accepted."""
        task = self.catalog.get(request.task)
        if task is None:
            raise ApiError(422, "unknown_task", f"no task named {request.task!r}",
                           {"task": request.task, "known_tasks": [t.name for t in self.catalog.tasks()]})
        missing = [name for name in task.input_fields if name not in request.input]
        unknown = sorted(name for name in request.input if name not in task.input_fields)
        empty = [name for name in task.input_fields if name in request.input and not request.input[name].strip()]
        if missing or unknown or empty:
            problems = [f"missing field(s) {missing}" if missing else "",
                        f"unknown field(s) {unknown}" if unknown else "",
                        f"empty field(s) {empty}" if empty else ""]
            raise ApiError(422, "invalid_input",
                           f"input of task {task.name!r}: " + "; ".join(p for p in problems if p),
                           {"input_fields": list(task.input_fields), "missing": missing, "unknown": unknown,
                            "empty": empty})
        input_chars = sum(len(value) for value in request.input.values())
        if input_chars > task.max_input_chars:
            raise ApiError(422, "input_too_long",
                           f"input of task {task.name!r} has {input_chars} characters; the limit is "
                           f"{task.max_input_chars}",
                           {"input_chars": input_chars, "max_input_chars": task.max_input_chars})
        route_request = RouteRequest(task=task, input_chars=input_chars, tier_hint=request.tier,
                                     job_local_only=request.local_only, tenant_local_only=tenant.local_only)
        try:
            route = decide_route(route_request)
        except RoutingConflict as exc:
            raise ApiError(422, exc.code, str(exc),
                           {"tier": request.tier.value, "job_local_only": request.local_only,
                            "tenant_local_only": tenant.local_only,
                            "task_local_only": task.routing.local_only}) from exc
        return Job(id=job_id or new_job_id(), tenant=tenant.id, task=task.name, input=dict(request.input),
                   priority=request.priority, tier_hint=request.tier,
                   # The effective value, so the workers never escalate a job of a local-only tenant.
                   local_only=is_local_only(route_request), metadata=dict(request.metadata),
                   callback_url=request.callback_url, route=route, created_at=now, updated_at=now,
                   # The submitting span: the publisher thread and the sweeper continue its trace.
                   queued_at=now, trace_id=telemetry.current_trace_id(),
                   traceparent=telemetry.current_traceparent())

    async def check_callbacks(self, tenant: Tenant, urls: Iterable[str]) -> dict[str, ApiError]:
        """The refused URLs among `urls`, each with its error. DNS runs on worker threads."""
        allow_private = self.settings.allow_private_callbacks or tenant.allow_private_callbacks
        refused: dict[str, ApiError] = {}

        async def check(url: str) -> None:
            try:
                if allow_private:
                    check_callback_url(url, True)
                else:
                    await anyio.to_thread.run_sync(check_callback_url, url, False)
            except CallbackUrlRefused as exc:
                refused[url] = ApiError(422, exc.code, str(exc), {"callback_url": url})

        async with anyio.create_task_group() as group:
            for url in set(urls):
                group.start_soon(check, url)
        return refused

    async def submit(self, tenant: Tenant, request: JobRequest) -> Job:
        with telemetry.tracer().start_as_current_span(k.SPAN_JOB_SUBMIT) as span:
            job = self.build_job(tenant, request, time.time())
            telemetry.annotate_job(job, span)
            await self._submit_one(tenant, job)
            return job

    async def _submit_one(self, tenant: Tenant, job: Job) -> None:
        if job.callback_url:
            refused = await self.check_callbacks(tenant, [job.callback_url])
            if refused:
                raise refused[job.callback_url]
        reservation = await self.quota.reserve(tenant, 1, partial=False)
        if reservation.granted < 1:
            raise reservation.error()
        await self.committer.create([job])
        await self._publish([job])
        self.metrics.jobs_submitted([job])

    async def submit_batch(self, tenant: Tenant, batch: BatchRequest) -> BatchOutcome:
        # One span for the batch (not one per job): its jobs share the request's trace.
        with telemetry.tracer().start_as_current_span(k.SPAN_JOB_SUBMIT):
            return await self._submit_batch(tenant, batch)

    async def _submit_batch(self, tenant: Tenant, batch: BatchRequest) -> BatchOutcome:
        if len(batch.jobs) > self.settings.max_batch_jobs:
            raise ApiError(422, "batch_too_large",
                           f"a batch holds at most {self.settings.max_batch_jobs} jobs, not {len(batch.jobs)}",
                           {"max_batch_jobs": self.settings.max_batch_jobs, "jobs": len(batch.jobs)})
        now = time.time()
        results: list[dict[str, Any] | None] = [None] * len(batch.jobs)
        built: list[tuple[int, Job]] = []
        job_ids = new_job_ids(len(batch.jobs))
        for index, raw in enumerate(batch.jobs):
            try:
                built.append((index, self.build_job(tenant, JobRequest.model_validate(raw), now, job_ids[index])))
            except ValidationError as exc:
                results[index] = _item_error(index, validation_error(exc, ("jobs", str(index))))
            except ApiError as exc:
                results[index] = _item_error(index, exc)
        refused = await self.check_callbacks(tenant, [job.callback_url for _, job in built if job.callback_url])
        if refused:
            for index, job in built:
                if job.callback_url in refused:
                    results[index] = _item_error(index, refused[job.callback_url])
            built = [(index, job) for index, job in built if job.callback_url not in refused]
        invalid = len(batch.jobs) - len(built)
        if invalid and (batch.all_or_nothing or not built):
            raise ApiError(422, "batch_rejected",
                           f"{invalid} of {len(batch.jobs)} jobs are invalid; nothing was stored",
                           {"results": [r for r in results if r is not None]})
        reservation = await self.quota.reserve(tenant, len(built), partial=not batch.all_or_nothing)
        accepted = built[:reservation.granted]
        if not accepted:
            limit = reservation.limit or 0
            error = quota_error(limit, reservation.retry_after_s)
            if len(built) > limit:
                error.message += f"; this batch of {len(built)} jobs is larger than the quota, split it"
            if not batch.all_or_nothing:
                error.details = {**error.details, "results": [_item_error(i, error) for i, _ in built]}
            raise error
        if len(accepted) < len(built):
            over_quota = quota_error(reservation.limit or 0, reservation.retry_after_s)
            for index, _ in built[len(accepted):]:
                results[index] = _item_error(index, over_quota)
        jobs = [job for _, job in accepted]
        await self.committer.create(jobs)
        await self._publish(jobs)
        self.metrics.jobs_submitted(jobs)
        for index, job in accepted:
            results[index] = {"index": index, "status": 202, "job": job.public(), "error": None}
        return BatchOutcome(accepted=len(accepted), results=[r for r in results if r is not None])

    async def _publish(self, jobs: Sequence[Job]) -> None:
        try:
            await self.pump.publish(jobs)
        except PublishError as exc:
            # Stored, so not lost: the sweeper publishes jobs that make no progress.
            log.warning("jobs %s stored but not published (%s); the sweeper will publish them",
                        [job.id for job in jobs[:5]], exc)

    # ---- reading ----------------------------------------------------------------------------------
    async def _owned(self, tenant: Tenant, job_id: str) -> Job:
        try:
            job = await self.store.get(job_id)
        except JobNotFound:
            raise job_not_found(job_id) from None
        # Another tenant's job does not exist, as far as this tenant can tell.
        if job.tenant != tenant.id:
            raise job_not_found(job_id)
        return job

    async def get(self, tenant: Tenant, job_id: str, wait_s: float = 0.0) -> Job:
        """The job; with `wait_s`, once it has ended or after `wait_s`, whichever is first."""
        if wait_s <= 0:
            return await self._owned(tenant, job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(wait_s, self.settings.long_poll_max_wait_s)
        # Watch before reading: an end between the read and the wait still wakes us.
        async with self.hub.watch(job_id) as ended:
            job = await self._owned(tenant, job_id)
            while not job.status.terminal:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(ended.wait(), remaining)
                except TimeoutError:
                    # Re-read once: the wake-up may have been lost while the subscription was down.
                    return await self._owned(tenant, job_id)
                ended.clear()
                job = await self._owned(tenant, job_id)
        return job

    async def list(self, tenant: Tenant, query: ListQuery) -> JobPage:
        """A tenant's jobs, newest first, `query.limit` at a time."""
        try:
            after = decode_cursor(query.cursor) if query.cursor is not None else None
        except InvalidCursor:
            raise ApiError(422, "invalid_cursor", "cursor is not one this API returned",
                           {"cursor": query.cursor}) from None
        # Scores are whole milliseconds: "before" is exclusive, "after" inclusive.
        max_score = None if query.created_before is None else _epoch_ms(query.created_before) - 1
        min_score = None if query.created_after is None else _epoch_ms(query.created_after)
        # Filters are applied to the records, so a filtered listing reads ahead in bigger steps.
        chunk = query.limit + 1 if not query.filtered else min(1000, max(100, 4 * (query.limit + 1)))
        found: list[tuple[Job, Position]] = []
        scanned = 0
        last_position: Position | None = None
        complete = True
        walk = self.index.walk(tenant.id, after=after, max_score=max_score, min_score=min_score, chunk=chunk)
        async with contextlib.aclosing(walk):
            async for positions in walk:
                jobs = {job.id: job for job in await self.store.get_many([job_id for _, job_id in positions])}
                await self.index.forget(tenant.id, [job_id for _, job_id in positions if job_id not in jobs])
                for position in positions:
                    last_position = position
                    job = jobs.get(position[1])
                    if job is not None and self._matches(job, query):
                        found.append((job, position))
                        if len(found) > query.limit:
                            break
                scanned += len(positions)
                if len(found) > query.limit or scanned >= self.settings.list_max_scan:
                    complete = False
                    break
        if len(found) > query.limit:
            page = found[:query.limit]
            return JobPage([job for job, _ in page], True, encode_cursor(page[-1][1]))
        if not complete and last_position is not None:
            # The scan budget ran out before the page filled: the next page goes on from there.
            return JobPage([job for job, _ in found], True, encode_cursor(last_position))
        return JobPage([job for job, _ in found], False, None)

    @staticmethod
    def _matches(job: Job, query: ListQuery) -> bool:
        return ((query.status is None or job.status is query.status)
                and (query.task is None or job.task == query.task)
                and (query.tier is None or job.current_tier is query.tier))

    # ---- changes ----------------------------------------------------------------------------------
    async def cancel(self, tenant: Tenant, job_id: str) -> Job:
        job = await self._owned(tenant, job_id)
        if not job.status.terminal:
            try:
                before, cancelled = await self.store.transition(job_id,
                                                                lambda j: lifecycle.cancel(j, now=time.time()))
                self.metrics.job_changed(before, cancelled)
                telemetry.annotate_job(cancelled)
                return cancelled
            except TransitionRefused:
                job = await self._owned(tenant, job_id)
            except JobNotFound:
                raise job_not_found(job_id) from None
        raise ApiError(409, "job_already_ended", f"job {job_id} already ended as {job.status.value}",
                       {"job": job.public()})

    async def stats(self, tenant: Tenant, task: str | None) -> StatsResponse:
        if task is not None:
            self.task(task)
        return await self.stats_reader.read(tenant.id, task)

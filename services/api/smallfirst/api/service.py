"""What the API does, apart from HTTP: the routes only parse and delegate to `JobService`.

Submission order: judge the request (task, input bytes and characters, route, callback URL
syntax), authenticate (the route did), the memory guard, the tenant's frontier budget, its quotas
(bytes, jobs in flight, submission rate: `admission`; then jobs per minute), resolve the callback
host (DNS, bounded: `CallbackChecker`), store
the job together with its publish-outbox entry in one transaction, then publish its message. A job
stored but not yet published is published by the sweeper from the outbox, so a crash between the
two loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from smallfirst.api.admission import MemoryGuard, admission_error, quota_limits
from smallfirst.api.callbacks import CallbackChecker
from smallfirst.api.commit import GroupCommitter
from smallfirst.api.errors import ApiError, json_bytes, validation_error
from smallfirst.api.events import JobEventHub
from smallfirst.api.idempotency import Receipt, StoredWrite
from smallfirst.api.listing import InvalidCursor, JobIndex, Position, decode_cursor, encode_cursor
from smallfirst.api.metrics import ApiMetrics
from smallfirst.api.models import BatchRequest, JobRequest, StatsResponse
from smallfirst.api.publishing import PublishError, PublishPump
from smallfirst.api.quota import QuotaLimiter, Reservation, quota_error
from smallfirst.api.settings import ApiSettings
from smallfirst.api.stats import StatsReader
from smallfirst.common import constants as k
from smallfirst.common import lifecycle, telemetry
from smallfirst.common.budgets import AsyncBudgetLedger, BudgetPolicy, BudgetState
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.jobs import Job, JobStatus, Tier, new_job_id, new_job_ids
from smallfirst.common.quotas import (
    CODE_CONTROL_CHARACTERS,
    CODE_INPUT_TOO_LARGE,
    AsyncQuotaGate,
    control_characters,
    input_bytes,
    stored_bytes,
)
from smallfirst.common.routing import RouteRequest, RoutingConflict, decide_route, is_local_only
from smallfirst.common.store import AsyncJobStore, JobNotFound, TransitionRefused
from smallfirst.common.tenants import Tenant

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

    def body(self) -> dict[str, Any]:
        return {"object": "batch", "accepted": self.accepted, "rejected": len(self.results) - self.accepted,
                "results": self.results}


    def replay(self) -> dict[str, Any]:
        """What the idempotency record keeps to answer a repeat: each item's status and error, and
        only the id of each job (the jobs are rendered as they are then)."""
        items = [{**item, "job": item["job"]["id"]} if item.get("job") else item for item in self.results]
        return {"batch": {**self.body(), "results": items}}


def _writes(write: StoredWrite | None) -> list[StoredWrite]:
    return [] if write is None else [write]


def withdraw_batched_request(pipe: Any, before: Job, _after: Job) -> None:
    """In a cancel's transaction: a batched attempt's request is withdrawn from its batch by the
    frontier pool's batch lane (from the buffer, or by cancelling a batch that carries nothing else)."""
    attempt = before.open_attempt()
    if attempt is not None and attempt.batched:
        pipe.sadd(k.BATCH_CANCEL_REQUESTS_KEY, k.batch_custom_id(before.id, attempt.number))


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
                 stats: StatsReader, metrics: ApiMetrics, callbacks: CallbackChecker) -> None:
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
        self.budgets = AsyncBudgetLedger(redis)
        self.gate = AsyncQuotaGate(redis)
        self.memory = MemoryGuard(redis, high_water=settings.redis_memory_high_water,
                                  interval_s=settings.redis_memory_check_interval_s)
        self.callbacks = callbacks
        # Long-polls held open per tenant in this process (the cap is per process: each holds a
        # connection and a subscription slot here, and that is the resource being bounded).
        self._long_polls: dict[str, int] = {}

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
        bad_characters = control_characters(request.input)
        if bad_characters:
            raise ApiError(422, CODE_CONTROL_CHARACTERS,
                           "input holds control characters; only tab and newline are accepted",
                           {"found": bad_characters})
        size_bytes = input_bytes(request.input)
        max_input_bytes = quota_limits(self.settings, tenant).max_input_bytes
        if max_input_bytes is not None and size_bytes > max_input_bytes:
            raise ApiError(413, CODE_INPUT_TOO_LARGE,
                           f"input of task {task.name!r} has {size_bytes} UTF-8 bytes; the limit is {max_input_bytes}",
                           {"input_bytes": size_bytes, "max_input_bytes": max_input_bytes})
        input_chars = sum(len(value) for value in request.input.values())
        if input_chars > task.max_input_chars:
            raise ApiError(422, "input_too_long",
                           f"input of task {task.name!r} has {input_chars} characters; the limit is "
                           f"{task.max_input_chars}",
                           {"input_chars": input_chars, "max_input_chars": task.max_input_chars})
        route_request = RouteRequest(task=task, input_chars=input_chars, tier_hint=request.tier,
                                     job_local_only=request.local_only, tenant_local_only=tenant.local_only,
                                     priority=request.priority, job_frontier_mode=request.frontier_mode,
                                     tenant_frontier_mode=tenant.frontier_mode)
        try:
            route = decide_route(route_request)
        except RoutingConflict as exc:
            raise ApiError(422, exc.code, str(exc),
                           {"tier": request.tier.value, "job_local_only": request.local_only,
                            "tenant_local_only": tenant.local_only,
                            "task_local_only": task.routing.local_only}) from exc
        return Job(id=job_id or new_job_id(), tenant=tenant.id, task=task.name, input=dict(request.input),
                   priority=request.priority, tier_hint=request.tier, frontier_mode=request.frontier_mode,
                   # The effective value, so the workers never escalate a job of a local-only tenant.
                   local_only=is_local_only(route_request), metadata=dict(request.metadata),
                   learning=request.learning and tenant.learning,
                   callback_url=request.callback_url, route=route, created_at=now, updated_at=now,
                   # The submitting span: the publisher thread and the sweeper continue its trace.
                   queued_at=now, trace_id=telemetry.current_trace_id(),
                   deadline_at=now + (request.deadline_s or self.settings.default_deadline_s(request.priority)),
                   retention_s=tenant.retention_s,
                   traceparent=telemetry.current_traceparent())

    async def submit(self, tenant: Tenant, request: JobRequest, receipt: Receipt | None = None) -> Job:
        """Accept one job; with `receipt`, its response is stored in the job's own transaction."""
        with telemetry.tracer().start_as_current_span(k.SPAN_JOB_SUBMIT) as span:
            job = self.build_job(tenant, request, time.time())
            telemetry.annotate_job(job, span)
            await self._submit_one(tenant, job, receipt)
            return job

    def _allow_private(self, tenant: Tenant) -> bool:
        return self.settings.allow_private_callbacks or tenant.allow_private_callbacks

    async def _submit_one(self, tenant: Tenant, job: Job, receipt: Receipt | None) -> None:
        if job.callback_url:
            syntax = CallbackChecker.check_syntax([job.callback_url])
            if syntax:
                raise syntax[job.callback_url]
        await self.memory.check()
        budget = await self.budget_state(tenant)
        if budget is not None and self.budget_refuses(budget, job):
            raise budget_error(budget)
        limits = quota_limits(self.settings, tenant)
        admission = await self.gate.admit(tenant.id, limits, [stored_bytes(job)], now=time.time(), partial=False)
        if admission.granted < 1:
            raise admission_error(admission, limits)
        reservation = await self.quota.reserve(tenant, 1, partial=False)
        if reservation.granted < 1:
            raise reservation.error()
        if job.callback_url and not self._allow_private(tenant):
            refused = await self._check_addresses(reservation, [job.callback_url])
            if refused:
                await self.quota.refund(reservation, 1)
                raise refused[job.callback_url]
        write = receipt.store_with_effect(202, json_bytes(job.public()), replay={"job": job.id}) if receipt else None
        await self.committer.create([job], _writes(write))
        await self._publish([job])
        self.metrics.jobs_submitted([job])

    async def _check_addresses(self, reservation: Reservation, urls: list[str]) -> dict[str, ApiError]:
        try:
            return await self.callbacks.check_addresses(urls)
        except ApiError:
            await self.quota.refund(reservation, reservation.granted)
            raise

    async def submit_batch(self, tenant: Tenant, batch: BatchRequest, receipt: Receipt | None = None) -> BatchOutcome:
        # One span for the batch (not one per job): its jobs share the request's trace.
        with telemetry.tracer().start_as_current_span(k.SPAN_JOB_SUBMIT):
            return await self._submit_batch(tenant, batch, receipt)

    async def _submit_batch(self, tenant: Tenant, batch: BatchRequest, receipt: Receipt | None) -> BatchOutcome:
        if len(batch.jobs) > self.settings.max_batch_jobs:
            raise ApiError(422, "batch_too_large",
                           f"a batch holds at most {self.settings.max_batch_jobs} jobs, not {len(batch.jobs)}",
                           {"max_batch_jobs": self.settings.max_batch_jobs, "jobs": len(batch.jobs)})
        await self.memory.check()
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
        built = self._drop_refused(built, results,
                                   CallbackChecker.check_syntax(j.callback_url for _, j in built if j.callback_url))
        budget = await self.budget_state(tenant)
        if budget is not None and budget.exceeded:
            over_budget = [(index, job) for index, job in built if self.budget_refuses(budget, job)]
            if over_budget and len(over_budget) == len(built) and len(built) == len(batch.jobs):
                raise budget_error(budget)
            for index, _ in over_budget:
                results[index] = _item_error(index, budget_error(budget))
            built = [(index, job) for index, job in built if not self.budget_refuses(budget, job)]
        self._reject_if_invalid(batch, results, built)
        if built:
            limits = quota_limits(self.settings, tenant)
            admission = await self.gate.admit(tenant.id, limits, [stored_bytes(job) for _, job in built],
                                              now=time.time(), partial=not batch.all_or_nothing)
            if admission.granted < len(built):
                over_quota = admission_error(admission, limits)
                if not admission.granted:
                    if not batch.all_or_nothing:
                        over_quota.details = {**over_quota.details,
                                              "results": [_item_error(i, over_quota) for i, _ in built]}
                    raise over_quota
                for index, _ in built[admission.granted:]:
                    results[index] = _item_error(index, over_quota)
                built = built[:admission.granted]
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
        if not self._allow_private(tenant):
            # DNS only now, for the jobs the quota let through; refused ones give their quota back.
            refused = await self._check_addresses(
                reservation, [job.callback_url for _, job in accepted if job.callback_url])
            if refused:
                kept = self._drop_refused(accepted, results, refused)
                if batch.all_or_nothing or not kept:
                    await self.quota.refund(reservation, len(accepted))
                    self._reject_if_invalid(batch, results, [])
                await self.quota.refund(reservation, len(accepted) - len(kept))
                accepted = kept
        jobs = [job for _, job in accepted]
        for index, job in accepted:
            results[index] = {"index": index, "status": 202, "job": job.public(), "error": None}
        outcome = BatchOutcome(accepted=len(accepted), results=[r for r in results if r is not None])
        write = receipt.store_with_effect(202, json_bytes(outcome.body()), replay=outcome.replay()) if receipt else None
        await self.committer.create(jobs, _writes(write))
        await self._publish(jobs)
        self.metrics.jobs_submitted(jobs)
        return outcome

    @staticmethod
    def _drop_refused(built: list[tuple[int, Job]], results: list[dict[str, Any] | None],
                      refused: dict[str, ApiError]) -> list[tuple[int, Job]]:
        if not refused:
            return built
        for index, job in built:
            if job.callback_url in refused:
                results[index] = _item_error(index, refused[job.callback_url])
        return [(index, job) for index, job in built if job.callback_url not in refused]

    @staticmethod
    def _reject_if_invalid(batch: BatchRequest, results: list[dict[str, Any] | None],
                           built: list[tuple[int, Job]]) -> None:
        invalid = len(batch.jobs) - len(built)
        if invalid and (batch.all_or_nothing or not built):
            raise ApiError(422, "batch_rejected",
                           f"{invalid} of {len(batch.jobs)} jobs are invalid; nothing was stored",
                           {"results": [r for r in results if r is not None]})

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
        held = self._long_polls.get(tenant.id, 0)
        if held >= self.settings.long_poll_max_per_tenant:
            raise ApiError(429, "too_many_long_polls",
                           f"this tenant already holds {held} long-polls open on this server; wait for one to "
                           "return, or poll without `wait`",
                           {"max_long_polls": self.settings.long_poll_max_per_tenant, "retry_after_s": 1},
                           headers={k.HEADER_RETRY_AFTER: "1"})
        self._long_polls[tenant.id] = held + 1
        try:
            return await self._wait_for_end(tenant, job_id, wait_s)
        finally:
            remaining = self._long_polls[tenant.id] - 1
            if remaining:
                self._long_polls[tenant.id] = remaining
            else:
                del self._long_polls[tenant.id]

    async def _wait_for_end(self, tenant: Tenant, job_id: str, wait_s: float) -> Job:
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
            # The cursor itself is not echoed: it may be anything, of any size.
            raise ApiError(400, "invalid_cursor", "cursor is not one this API returned; use next_cursor "
                           "of the previous page as it was") from None
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
                before, cancelled = await self.store.transition(
                    job_id, lambda j: lifecycle.cancel(j, now=time.time()), withdraw_batched_request)
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
        stats = await self.stats_reader.read(tenant.id, task)
        budget = await self.budgets.state(tenant.id, time.time())
        if budget is not None:
            stats.budget = budget.public()
        return stats

    async def render_replay(self, tenant: Tenant, replay: dict[str, Any]) -> Any:
        """A response again from its idempotency record: the jobs as they are now."""
        if "job" in replay:
            try:
                return (await self._owned(tenant, str(replay["job"]))).public()
            except ApiError:
                return {"object": "job", "id": replay["job"], "expired": True}
        batch = dict(replay["batch"])
        ids = [item["job"] for item in batch["results"] if item.get("job")]
        jobs = {job.id: job for job in await self.store.get_many(ids)}
        batch["results"] = [
            {**item, "job": jobs[item["job"]].public() if item["job"] in jobs
             else {"object": "job", "id": item["job"], "expired": True}} if item.get("job") else item
            for item in batch["results"]]
        return batch

    # ---- budgets ----------------------------------------------------------------------------------
    async def budget_state(self, tenant: Tenant) -> BudgetState | None:
        if tenant.budget_daily_usd is None and tenant.budget_monthly_usd is None:
            return None
        return await self.budgets.state(tenant.id, time.time())

    @staticmethod
    def budget_refuses(budget: BudgetState | None, job: Job) -> bool:
        """A tenant past its budget: `fail` takes no new job; `small_only` no job routed to the
        frontier (it would fail at once); `hold` takes them all (they wait)."""
        if budget is None or not budget.exceeded:
            return False
        if budget.policy is BudgetPolicy.FAIL:
            return True
        return budget.policy is BudgetPolicy.SMALL_ONLY and job.route.tier is Tier.FRONTIER


def budget_error(budget: BudgetState) -> ApiError:
    error = budget.error()
    retry_after_s = max(1, int(budget.resets_at - time.time()))
    return ApiError(402, error.code, error.message + f" (policy {budget.policy.value})", error.details,
                    headers={k.HEADER_RETRY_AFTER: str(retry_after_s)})

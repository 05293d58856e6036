"""What the dashboard's pages show, apart from HTML: one `DashboardViews`, built once per app.

Routes call one method per page with the `Viewer` (who is looking) and get back plain dataclasses
that the templates render. Every read goes through the same stores the JSON API reads: the job
store, the tenant index, the stats counters (`StatsReader`'s fields, summed over tenants for the
operator) and their time series (`store.series_fields`), the queues' Redis lists.

A tenant sees its own jobs and figures only; the operator sees every tenant's. Listing every
tenant's jobs merges the tenants' own newest-first walks (`JobService.list`), so positions and
cursors mean the same as in `GET /v1/jobs`.

Two sources are pluggable, because what they read is built elsewhere: `DeadLetterSource` (until a
dead-letter store exists, failed jobs with their error codes stand in, without replay) and
`LearningSource` (what the catalog says about each task's learning data, until more is recorded).
"""

from __future__ import annotations

import hmac
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import redis.asyncio as aioredis

from smallfirst.api.dashboard import charts
from smallfirst.api.dashboard.session import Role, Session, key_fingerprint
from smallfirst.api.deadletters import DeadLetterQuery, DeadLetterService
from smallfirst.api.errors import ApiError
from smallfirst.api.listing import decode_cursor, encode_cursor
from smallfirst.api.models import TaskStats
from smallfirst.api.service import JobService, ListQuery
from smallfirst.api.stats import ALL_TASKS, task_stats
from smallfirst.common import constants as k
from smallfirst.common.budgets import BudgetState
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.deadletters import DeadLetter as StoredEntry
from smallfirst.common.deadletters import entry_of
from smallfirst.common.jobs import Job, JobStatus, Tier
from smallfirst.common.store import JobNotFound
from smallfirst.common.tenants import AsyncTenantRegistry, Tenant, TenantError

# How many of the longest-waiting active jobs are read to find the oldest waiting one.
OLDEST_SCAN = 200
PAGE_SIZE = 25


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def format_time(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso_time(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


# ---- who is looking -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Viewer:
    session: Session
    tenant: Tenant | None  # None: the operator

    @property
    def is_operator(self) -> bool:
        return self.session.role is Role.OPERATOR

    @property
    def label(self) -> str:
        return "operator" if self.tenant is None else f"{self.tenant.name} ({self.tenant.id})"

    def may_see(self, job: Job) -> bool:
        return self.is_operator or (self.tenant is not None and job.tenant == self.tenant.id)


# ---- page models --------------------------------------------------------------------------------
@dataclass(frozen=True)
class QueueDepth:
    queue: str
    waiting: int


@dataclass(frozen=True)
class WaitingJob:
    job_id: str
    tenant: str
    task: str
    status: str
    queued_at: str
    waiting_for: str


@dataclass(frozen=True)
class CostSummary:
    spent_usd: float
    spent_small_usd: float
    spent_frontier_usd: float
    all_frontier_usd: float  # what the same jobs would have cost on the frontier tier alone
    savings_usd: float
    savings_share: float | None
    batch_cost_usd: float = 0.0  # what frontier attempts sent in Message Batches cost (batch price)
    batch_savings_usd: float = 0.0  # what batching saved against the realtime price


@dataclass(frozen=True)
class Overview:
    window: str
    windows: tuple[str, ...]
    totals: TaskStats
    tasks: list[TaskStats]
    tiers_chart: str  # inline SVG
    escalation_chart: str
    cost: CostSummary
    cost_chart: str
    queues: list[QueueDepth] | None  # None: not shown to tenants
    unacked: int | None
    jobs_waiting: int
    oldest_waiting: WaitingJob | None
    generated_at: str
    # The tenant's frontier budget, said in words ("" without one; operators see each tenant's in /v1/stats).
    budget: str = ""


@dataclass(frozen=True)
class JobRow:
    id: str
    tenant: str
    task: str
    status: str
    tier: str
    served_by: str
    escalated: bool
    cost_usd: float
    created_at: str
    created_iso: str


@dataclass(frozen=True)
class JobsFilter:
    status: JobStatus | None = None
    task: str | None = None
    tier: Tier | None = None
    tenant: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    q: str = ""
    cursor: str | None = None

    def params(self, **override: str | None) -> dict[str, str]:
        """The filter as query parameters (for the next page's link), with `override` applied."""
        values: dict[str, str | None] = {
            "status": self.status.value if self.status else None, "task": self.task,
            "tier": self.tier.value if self.tier else None, "tenant": self.tenant,
            "created_after": self.created_after.isoformat() if self.created_after else None,
            "created_before": self.created_before.isoformat() if self.created_before else None,
            "q": self.q or None,
        }
        values.update(override)
        return {name: value for name, value in values.items() if value}


@dataclass(frozen=True)
class JobsPage:
    filter: JobsFilter
    rows: list[JobRow]
    next_cursor: str | None
    tasks: list[str]
    tenants: list[str]  # for the operator's tenant filter; empty for a tenant
    statuses: list[str]
    tiers: list[str]
    notice: str = ""


@dataclass(frozen=True)
class AttemptView:
    number: int
    tier: str
    model: str
    worker: str
    outcome: str
    started_at: str
    latency: str
    queue_wait: str
    input_tokens: int
    output_tokens: int
    cost_usd: float
    billed: bool
    estimated_frontier_cost_usd: float | None
    confidence: float | None
    verdict_passed: bool | None
    verdict_reasons: list[str]
    answer: Any
    error: dict[str, Any] | None


@dataclass(frozen=True)
class WebhookView:
    callback_url: str
    tries: int
    last_status: str
    last_detail: str
    last_try_at: str
    gave_up: bool
    pending: bool


@dataclass(frozen=True)
class JobDetail:
    job: Job
    public: dict[str, Any]
    attempts: list[AttemptView]
    served_by: str
    cost_usd: float
    created_at: str
    ended_at: str
    duration: str
    webhook: WebhookView | None
    dead_letter: DeadLetter | None
    replay_supported: bool
    feedback: list[dict[str, Any]]
    live: bool  # the page refreshes itself until the job ends


@dataclass(frozen=True)
class DeadLetter:
    job_id: str
    tenant: str
    task: str
    reason: str
    message: str
    failed_at: str
    replayable: bool


@dataclass(frozen=True)
class DeadLetterPage:
    letters: list[DeadLetter]
    next_cursor: str | None
    replay_supported: bool
    source_note: str  # what the list is read from, said on the page


@dataclass
class LearningFigures:
    """What is recorded about a task's learning; None: not recorded (the page says so)."""

    model_versions: list[dict[str, Any]] | None = None
    shadow_agreement: float | None = None
    heldout_accuracy: float | None = None
    target_accuracy: float | None = None
    examples_by_source: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskLearning:
    task: Task
    stats: TaskStats | None
    frontier_share: float | None
    frontier_share_chart: str
    figures: LearningFigures


# ---- pluggable sources ------------------------------------------------------------------------------
class DeadLetterSource(Protocol):
    replay_supported: bool
    source_note: str

    async def page(self, viewer: Viewer, tenants: Sequence[Tenant], cursor: str | None,
                   limit: int) -> tuple[list[DeadLetter], str | None]: ...

    async def find(self, job: Job) -> DeadLetter | None: ...

    async def replay(self, tenant: Tenant, job_id: str) -> Job: ...


class LearningSource(Protocol):
    async def figures(self, task: Task, tenant_ids: Sequence[str]) -> LearningFigures: ...


class CatalogLearning:
    """What the catalog itself holds about learning: the seed examples per label."""

    async def figures(self, task: Task, tenant_ids: Sequence[str]) -> LearningFigures:
        seeds = sum(len(label.examples) for label in task.labels)
        return LearningFigures(examples_by_source={"catalog seed examples": seeds} if task.labels else {})


# ---- the view model ------------------------------------------------------------------------------
WINDOWS: dict[str, tuple[int, int]] = {"1h": (k.SERIES_MINUTE_S, 60), "24h": (k.SERIES_HOUR_S, 24),
                                       "7d": (k.SERIES_HOUR_S, 168)}
DEFAULT_WINDOW = "1h"


class DashboardViews:
    def __init__(self, *, catalog: Catalog, redis: aioredis.Redis, service: JobService,
                 tenants: AsyncTenantRegistry, operator_key: str | None,
                 dead_letters: DeadLetterSource | None = None, learning: LearningSource | None = None) -> None:
        self.catalog = catalog
        self.redis = redis
        self.service = service
        self.tenants = tenants
        self._operator_fingerprint = key_fingerprint(operator_key) if operator_key else None
        self._operator_key = operator_key
        self.dead_letter_source: DeadLetterSource = dead_letters or FailedJobsAsDeadLetters(self)
        self.learning_source: LearningSource = learning or CatalogLearning()

    # ---- identity ---------------------------------------------------------------------------------
    async def identify(self, api_key: str) -> tuple[Role, Tenant | None] | None:
        """The role a key logs in as: the operator key, or a tenant's valid key; None otherwise."""
        api_key = api_key.strip()
        if not api_key:
            return None
        if self._operator_key is not None and hmac.compare_digest(api_key.encode(), self._operator_key.encode()):
            return Role.OPERATOR, None
        tenant = await self.tenants.lookup(api_key)
        return (Role.TENANT, tenant) if tenant is not None else None

    async def viewer(self, session: Session | None) -> Viewer | None:
        """Who a session is, if the key that opened it is still valid."""
        if session is None:
            return None
        if session.role is Role.OPERATOR:
            fingerprint = self._operator_fingerprint
            if fingerprint is None or not hmac.compare_digest(fingerprint, session.key_fingerprint):
                return None
            return Viewer(session, None)
        try:
            tenant = await self.tenants.get(session.tenant_id or "")
        except TenantError:
            return None
        if not any(hmac.compare_digest(digest[:len(session.key_fingerprint)], session.key_fingerprint)
                   for digest in tenant.api_key_hashes):
            return None
        return Viewer(session, tenant)

    async def visible_tenants(self, viewer: Viewer) -> list[Tenant]:
        if viewer.tenant is not None:
            return [viewer.tenant]
        records: dict[Any, Any] = await self.redis.hgetall(k.TENANTS_KEY)
        return sorted((Tenant.model_validate_json(raw) for raw in records.values()), key=lambda t: t.id)

    async def tenant_ids(self, viewer: Viewer) -> list[str]:
        return [tenant.id for tenant in await self.visible_tenants(viewer)]

    # ---- overview ---------------------------------------------------------------------------------
    async def _raw_stats(self, tenant_ids: Sequence[str]) -> dict[str, dict[str, float]]:
        """Per task, the stats counters summed over `tenant_ids`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id in tenant_ids:
                pipe.smembers(k.stats_index_key(tenant_id))
            indexes: list[Any] = await pipe.execute() if tenant_ids else []
        pairs = [(tenant_id, _text(task)) for tenant_id, names in zip(tenant_ids, indexes, strict=True)
                 for task in names]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id, task in pairs:
                pipe.hgetall(k.stats_key(tenant_id, task))
            raws: list[Any] = await pipe.execute() if pairs else []
        summed: dict[str, dict[str, float]] = {}
        for (_, task), raw in zip(pairs, raws, strict=True):
            fields = summed.setdefault(task, {})
            for name, value in raw.items():
                fields[_text(name)] = fields.get(_text(name), 0.0) + float(_text(value))
        return summed

    async def _series(self, tenant_ids: Sequence[str], window: str,
                      now: float) -> tuple[list[float], list[dict[str, float]]]:
        """Bucket starts (oldest first) and, per bucket, the series fields summed over tenants."""
        bucket_s, count = WINDOWS[window]
        last = int(now // bucket_s) * bucket_s
        starts = [last - bucket_s * i for i in range(count - 1, -1, -1)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id in tenant_ids:
                for start in starts:
                    pipe.hgetall(k.stats_series_key(tenant_id, bucket_s, start))
            raws: list[Any] = await pipe.execute() if tenant_ids else []
        buckets: list[dict[str, float]] = [{} for _ in starts]
        for index, raw in enumerate(raws):
            bucket = buckets[index % len(starts)]
            for name, value in raw.items():
                bucket[_text(name)] = bucket.get(_text(name), 0.0) + float(_text(value))
        return [float(s) for s in starts], buckets

    async def overview(self, viewer: Viewer, window: str | None = None) -> Overview:
        window = window if window in WINDOWS else DEFAULT_WINDOW
        now = time.time()
        tenant_ids = await self.tenant_ids(viewer)
        raw = await self._raw_stats(tenant_ids)
        tasks = [task_stats(name, fields) for name, fields in sorted(raw.items())]
        totals_fields: dict[str, float] = {}
        for fields in raw.values():
            for name, value in fields.items():
                totals_fields[name] = totals_fields.get(name, 0.0) + value
        totals = task_stats(ALL_TASKS, totals_fields)
        starts, buckets = await self._series(tenant_ids, window, now)
        bucket_s = WINDOWS[window][0]
        tiers_chart = charts.stacked_bars(
            title=f"Jobs ended per tier, last {window}",
            labels=[charts.bucket_label(s, bucket_s) for s in starts],
            series=[("answered by small", "small", [_sum_suffix(b, "/served:small") for b in buckets]),
                    ("answered by frontier", "frontier", [_sum_suffix(b, "/served:frontier") for b in buckets]),
                    ("failed", "failed", [_sum_suffix(b, "/status:failed") for b in buckets]),
                    ("cancelled", "cancelled", [_sum_suffix(b, "/status:cancelled") for b in buckets])])
        escalation_chart = charts.horizontal_bars(
            title="Escalation reasons, all tasks",
            items=sorted(totals.escalation_reasons.items(), key=lambda item: -item[1]))
        cost = _cost_summary(totals)
        cost_chart = charts.horizontal_bars(
            title="Spend against all-frontier (USD)",
            items=[("spent: small tier", cost.spent_small_usd), ("spent: frontier tier", cost.spent_frontier_usd),
                   ("all-frontier estimate", cost.all_frontier_usd)], money=True)
        queues: list[QueueDepth] | None = None
        unacked: int | None = None
        if viewer.is_operator:
            queues, unacked = await self._queues()
        waiting, oldest = await self._oldest_waiting(viewer, now)
        budget = await self.service.budget_state(viewer.tenant) if viewer.tenant is not None else None
        return Overview(window=window, windows=tuple(WINDOWS), totals=totals, tasks=tasks, tiers_chart=tiers_chart,
                        escalation_chart=escalation_chart, cost=cost, cost_chart=cost_chart, queues=queues,
                        unacked=unacked, jobs_waiting=waiting, oldest_waiting=oldest, generated_at=format_time(now),
                        budget=_budget_text(budget))

    async def _queues(self) -> tuple[list[QueueDepth], int]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue in k.ALL_QUEUES:
                for key in k.queue_backlog_keys(queue):
                    pipe.llen(key)
            pipe.hlen(k.KOMBU_UNACKED_KEY)
            results: list[Any] = await pipe.execute()
        depths: list[QueueDepth] = []
        start = 0
        for queue in k.ALL_QUEUES:
            end = start + len(k.queue_backlog_keys(queue))
            depths.append(QueueDepth(queue, sum(int(n) for n in results[start:end])))
            start = end
        return depths, int(results[-1])

    async def _oldest_waiting(self, viewer: Viewer, now: float) -> tuple[int, WaitingJob | None]:
        """Jobs waiting in a queue among the longest-due active jobs, and the one waiting longest.

        The active-jobs index is scored by when each job must next make progress, which for a
        waiting job is a fixed while after it was queued: its lowest scores are the oldest waits."""
        ids = [_text(i) for i in await self.redis.zrange(k.ACTIVE_JOBS_KEY, 0, OLDEST_SCAN - 1)]
        jobs = [job for job in await self.service.store.get_many(ids) if viewer.may_see(job)]
        waiting = [job for job in jobs if job.status in (JobStatus.QUEUED, JobStatus.ESCALATED)]
        if not waiting:
            return 0, None
        oldest = min(waiting, key=lambda job: job.queued_at)
        return len(waiting), WaitingJob(
            job_id=oldest.id, tenant=oldest.tenant, task=oldest.task, status=oldest.status.value,
            queued_at=format_time(oldest.queued_at), waiting_for=format_duration(now - oldest.queued_at))

    # ---- jobs ---------------------------------------------------------------------------------
    async def jobs(self, viewer: Viewer, wanted: JobsFilter, limit: int = PAGE_SIZE) -> JobsPage:
        tenants = await self.visible_tenants(viewer)
        listed = [t for t in tenants if t.id == wanted.tenant] if wanted.tenant and viewer.is_operator else tenants
        query = ListQuery(limit=limit, cursor=wanted.cursor, status=wanted.status, task=wanted.task, tier=wanted.tier,
                          created_after=wanted.created_after, created_before=wanted.created_before)
        jobs, cursor = await self.merged_list(listed, query)
        return JobsPage(filter=wanted, rows=[job_row(job) for job in jobs], next_cursor=cursor,
                        tasks=[task.name for task in self.catalog.tasks()],
                        tenants=[t.id for t in tenants] if viewer.is_operator else [],
                        statuses=[status.value for status in JobStatus], tiers=[tier.value for tier in Tier])

    async def merged_list(self, tenants: Sequence[Tenant], query: ListQuery) -> tuple[list[Job], str | None]:
        """Newest first over several tenants: each tenant's page after the same position, merged.

        A tenant whose page stopped early (more jobs, or its scan budget spent) bounds the merged
        page: nothing older than where it stopped is shown, so no job of it is skipped."""
        found: list[Job] = []
        bound: tuple[int, str] | None = None
        for tenant in tenants:
            page = await self.service.list(tenant, query)
            found.extend(page.jobs)
            if page.has_more and page.next_cursor is not None:
                stop = decode_cursor(page.next_cursor)
                bound = stop if bound is None or stop > bound else bound
        found.sort(key=_position, reverse=True)
        if bound is not None:
            found = [job for job in found if _position(job) >= bound]
        more = len(found) > query.limit or bound is not None
        page_jobs = found[:query.limit]
        if not more:
            return page_jobs, None
        if len(found) > query.limit:
            return page_jobs, encode_cursor(_position(page_jobs[-1]))
        return page_jobs, encode_cursor(bound) if bound is not None else None

    async def visible_job(self, viewer: Viewer, job_id: str) -> Job:
        try:
            job = await self.service.store.get(job_id)
        except JobNotFound:
            raise ApiError(404, "job_not_found", f"no job {job_id!r}", {"job_id": job_id}) from None
        if not viewer.may_see(job):
            raise ApiError(404, "job_not_found", f"no job {job_id!r}", {"job_id": job_id})
        return job

    async def job(self, viewer: Viewer, job_id: str) -> JobDetail:
        job = await self.visible_job(viewer, job_id)
        webhook = await self._webhook(job)
        ended = job.ended_at
        return JobDetail(
            job=job, public=job.public(),
            attempts=[_attempt_view(a, show_worker=viewer.is_operator) for a in job.attempts],
            served_by=_served_by(job), cost_usd=round(job.total_cost_usd(), 8), created_at=format_time(job.created_at),
            ended_at=format_time(ended), duration=format_duration(ended - job.created_at) if ended else "running",
            webhook=webhook, dead_letter=await self.dead_letter_source.find(job),
            replay_supported=self.dead_letter_source.replay_supported,
            feedback=_feedback(job), live=not job.status.terminal)

    async def _webhook(self, job: Job) -> WebhookView | None:
        if not job.callback_url:
            return None
        raw = {_text(name): _text(value) for name, value in
               (await self.redis.hgetall(k.webhook_delivery_key(job.id))).items()}
        pending = await self.redis.zscore(k.WEBHOOK_OUTBOX_KEY, job.id) is not None
        last_try = raw.get("last_try_at")
        return WebhookView(callback_url=job.callback_url, tries=int(raw.get("tries", 0)),
                           last_status=raw.get("last_status", ""), last_detail=raw.get("last_detail", ""),
                           last_try_at=format_time(float(last_try)) if last_try else "",
                           gave_up=raw.get("gave_up") == "1", pending=pending)

    # ---- dead letters -----------------------------------------------------------------------------
    async def dead_letters(self, viewer: Viewer, cursor: str | None) -> DeadLetterPage:
        letters, next_cursor = await self.dead_letter_source.page(viewer, await self.visible_tenants(viewer), cursor,
                                                                  PAGE_SIZE)
        return DeadLetterPage(letters=letters, next_cursor=next_cursor,
                              replay_supported=self.dead_letter_source.replay_supported,
                              source_note=self.dead_letter_source.source_note)

    async def replay(self, viewer: Viewer, job_id: str) -> Job:
        job = await self.visible_job(viewer, job_id)
        if not self.dead_letter_source.replay_supported:
            raise ApiError(409, "replay_unavailable", "this deployment has no dead-letter replay")
        tenant = viewer.tenant or await self.tenants.get(job.tenant)
        return await self.dead_letter_source.replay(tenant, job_id)

    # ---- learning ---------------------------------------------------------------------------------
    async def learning(self, viewer: Viewer) -> list[TaskLearning]:
        now = time.time()
        tenant_ids = await self.tenant_ids(viewer)
        raw = await self._raw_stats(tenant_ids)
        window = "24h"
        starts, buckets = await self._series(tenant_ids, window, now)
        labels = [charts.bucket_label(s, WINDOWS[window][0]) for s in starts]
        pages = []
        for task in self.catalog.tasks():
            stats = task_stats(task.name, raw[task.name]) if task.name in raw else None
            shares = [_frontier_share(b.get(f"{task.name}/served:small", 0.0),
                                      b.get(f"{task.name}/served:frontier", 0.0)) for b in buckets]
            chart = charts.line(title=f"Frontier share of answers, {task.name}, last {window}", labels=labels,
                                values=shares, as_percent=True)
            overall = _frontier_share(stats.served.small, stats.served.frontier) if stats else None
            pages.append(TaskLearning(task=task, stats=stats, frontier_share=overall, frontier_share_chart=chart,
                                      figures=await self.learning_source.figures(task, tenant_ids)))
        return pages


class FailedJobsAsDeadLetters:
    """Stands in for a dead-letter store: the failed jobs, newest first, with their error codes.
    Nothing can be replayed from here."""

    replay_supported = False
    source_note = ("No dead-letter store is configured: this lists failed jobs with their error codes. "
                   "Replay needs the dead-letter store.")

    def __init__(self, views: DashboardViews) -> None:
        self.views = views

    async def page(self, viewer: Viewer, tenants: Sequence[Tenant], cursor: str | None,
                   limit: int) -> tuple[list[DeadLetter], str | None]:
        jobs, next_cursor = await self.views.merged_list(
            tenants, ListQuery(limit=limit, cursor=cursor, status=JobStatus.FAILED))
        letters = [await self.find(job) for job in jobs]
        return [letter for letter in letters if letter is not None], next_cursor

    async def find(self, job: Job) -> DeadLetter | None:
        if job.status is not JobStatus.FAILED:
            return None
        error = job.error
        return DeadLetter(job_id=job.id, tenant=job.tenant, task=job.task,
                          reason=error.code if error else "unknown", message=error.message if error else "",
                          failed_at=format_time(job.ended_at or job.updated_at), replayable=False)

    async def replay(self, tenant: Tenant, job_id: str) -> Job:
        raise ApiError(409, "replay_unavailable", "this deployment has no dead-letter replay")


def _position(job: Job) -> tuple[int, str]:
    # The index's score of a job: its creation time in whole milliseconds (store._write_effects).
    return int(job.created_at * 1000), job.id


def _sum_suffix(bucket: Mapping[str, float], suffix: str) -> float:
    return sum(value for name, value in bucket.items() if name.endswith(suffix))


def _frontier_share(small: float, frontier: float) -> float | None:
    answered = small + frontier
    return frontier / answered if answered else None


def _cost_summary(totals: TaskStats) -> CostSummary:
    # All-frontier: what the frontier tier was paid, plus what it would have charged for the
    # answers the small tier gave instead (the stats' estimate per small-served job).
    all_frontier = totals.cost_usd_by_tier.frontier + totals.estimated_frontier_cost_usd
    savings = all_frontier - totals.cost_usd
    return CostSummary(spent_usd=totals.cost_usd, spent_small_usd=totals.cost_usd_by_tier.small,
                       spent_frontier_usd=totals.cost_usd_by_tier.frontier, all_frontier_usd=all_frontier,
                       savings_usd=savings, savings_share=savings / all_frontier if all_frontier > 0 else None,
                       batch_cost_usd=totals.batch_cost_usd, batch_savings_usd=totals.batch_savings_usd)


def _served_by(job: Job) -> str:
    accepted = [a for a in job.attempts if a.outcome.value == "accepted"]
    return accepted[-1].tier.value if accepted and job.status is JobStatus.SUCCEEDED else ""


def job_row(job: Job) -> JobRow:
    return JobRow(id=job.id, tenant=job.tenant, task=job.task, status=job.status.value, tier=job.current_tier.value,
                  served_by=_served_by(job),
                  escalated=any(a.tier is Tier.SMALL for a in job.attempts)
                  and any(a.tier is Tier.FRONTIER for a in job.attempts),
                  cost_usd=round(job.total_cost_usd(), 8), created_at=format_time(job.created_at),
                  created_iso=iso_time(job.created_at))


def _attempt_view(attempt: Any, *, show_worker: bool) -> AttemptView:
    verdict = attempt.verdict
    # A worker's host name says something of the deployment's insides: the operator's, not a tenant's.
    return AttemptView(
        number=attempt.number, tier=attempt.tier.value, model=attempt.model,
        worker=attempt.worker if show_worker else "",
        outcome=attempt.outcome.value, started_at=format_time(attempt.started_at),
        latency=format_duration(attempt.latency_ms / 1000) if attempt.latency_ms is not None else "n/a",
        queue_wait=format_duration(attempt.queue_wait_ms / 1000) if attempt.queue_wait_ms is not None else "n/a",
        input_tokens=attempt.usage.input_tokens, output_tokens=attempt.usage.output_tokens,
        cost_usd=round(attempt.cost_usd, 8), billed=attempt.billed,
        estimated_frontier_cost_usd=attempt.estimated_frontier_cost_usd, confidence=attempt.confidence,
        verdict_passed=verdict.passed if verdict is not None else None,
        verdict_reasons=list(verdict.reasons) if verdict is not None else [],
        answer=attempt.answer, error=attempt.error.model_dump() if attempt.error is not None else None)


def _feedback(job: Job) -> list[dict[str, Any]]:
    # Jobs carry no feedback field yet; a record that has one (a newer writer) is shown as is.
    extra = job.model_extra or {}
    value = extra.get("feedback")
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    return [value] if isinstance(value, dict) else []


def percent(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value * 100:.1f} %"


def money(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"${value:,.6f}" if abs(value) < 1 else f"${value:,.2f}"


class StoredDeadLetters:
    """The dead-letter store (what `GET /v1/dead-letters` reads), for the dashboard: entries newest
    first, one tenant's through that API's cursors; an operator's page merges each tenant's first
    entries (newest first), without a cursor across tenants. Replay is the API's replay."""

    replay_supported = True
    source_note = "Jobs that failed for a reason a person can act on; a replay starts a new run of the same job."

    def __init__(self, service: DeadLetterService) -> None:
        self.service = service

    async def page(self, viewer: Viewer, tenants: Sequence[Tenant], cursor: str | None,
                   limit: int) -> tuple[list[DeadLetter], str | None]:
        if len(tenants) == 1:
            found = await self.service.list_entries(tenants[0], DeadLetterQuery(limit=limit, cursor=cursor))
            return [_letter(entry) for entry in found.entries], found.next_cursor
        entries = []
        for tenant in tenants:
            entries += (await self.service.list_entries(tenant, DeadLetterQuery(limit=limit))).entries
        entries.sort(key=lambda entry: entry.failed_at, reverse=True)
        return [_letter(entry) for entry in entries[:limit]], None

    async def find(self, job: Job) -> DeadLetter | None:
        if job.status is not JobStatus.FAILED or job.dead_letter is None:
            return None
        return _letter(entry_of(job))

    async def replay(self, tenant: Tenant, job_id: str) -> Job:
        return (await self.service.replay(tenant, job_id)).job


def _letter(entry: StoredEntry) -> DeadLetter:
    return DeadLetter(job_id=entry.job_id or entry.id, tenant=entry.tenant, task=entry.task or "",
                      reason=entry.reason, message=entry.message, failed_at=format_time(entry.failed_at),
                      replayable=entry.job_id is not None)


def _budget_text(state: BudgetState | None) -> str:
    if state is None:
        return ""
    parts = [f"{p.period}: {money(p.spent_usd)} of {money(p.limit_usd)}" for p in state.periods
             if p.limit_usd is not None]
    return f"{', '.join(parts)} ({state.status}; policy {state.policy.value})"

"""How a worker runs one delivery of a job: claim an attempt, then end it exactly once.

Both worker pools use this; what differs between them (calling the inference service or the
frontier API) stays in their own packages. Every method turns a refused transition (the job was
cancelled meanwhile, or another delivery owns it) into a logged no-op, so a late answer never
overwrites a cancel and a duplicate delivery never runs twice.

Every transition the store accepts is counted in the job metrics (with the record before and after
it, so each is counted exactly once) and described on the current span (the worker's job span).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smallfirst.common import lifecycle
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.jobs import ErrorInfo, Job, JobStatus, Tier, Usage, Verdict
from smallfirst.common.metrics import JobMetrics, default_job_metrics
from smallfirst.common.queues import Publisher
from smallfirst.common.store import JobNotFound, JobStore
from smallfirst.common.telemetry import annotate_job

log = logging.getLogger(__name__)


class TaskNotInCatalog(LookupError):
    """A job names a task this worker's catalog does not have (catalogs out of step between pods)."""


@dataclass
class AttemptContext:
    job: Job
    task: Task
    attempt_number: int
    task_id: str

    @property
    def local_only(self) -> bool:
        return self.job.local_only or self.task.routing.local_only


class JobExecution:
    def __init__(self, store: JobStore, publisher: Publisher, catalog: Catalog, *, lease_s: float,
                 worker_name: str | None = None, clock: Callable[[], float] = time.time,
                 metrics: JobMetrics | None = None) -> None:
        self.store = store
        self.publisher = publisher
        self.catalog = catalog
        self.lease_s = lease_s
        self.worker_name = worker_name or socket.gethostname()
        self.clock = clock
        # The process's set on the default registry (what the pool's metrics server serves) unless given.
        self.metrics = default_job_metrics() if metrics is None else metrics

    def _record(self, before: Job, after: Job) -> None:
        self.metrics.record_job_transition(before, after)
        annotate_job(after)

    def begin(self, job_id: str, tier: Tier, task_id: str) -> AttemptContext | None:
        """Claim an attempt for this delivery, or None when there is nothing for it to do."""
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            log.warning("job %s: not found (expired or never stored); dropping its message", job_id)
            return None
        task = self.catalog.get(job.task)
        if task is None:
            raise TaskNotInCatalog(f"job {job_id}: task {job.task!r} is not in this worker's catalog")
        model = task.small.model if tier is Tier.SMALL else task.frontier.model
        try:
            old, new = self.store.transition(job_id, lambda j: lifecycle.begin_attempt(
                j, tier=tier, model=model, worker=self.worker_name, task_id=task_id, now=self.clock(),
                lease_s=self.lease_s))
        except lifecycle.TransitionRefused as refused:
            self._on_refused_begin(job_id, tier, refused.reason)
            return None
        self._record(old, new)
        attempt = new.attempts[-1]
        return AttemptContext(job=new, task=task, attempt_number=attempt.number, task_id=task_id)

    def _on_refused_begin(self, job_id: str, tier: Tier, reason: str) -> None:
        if tier is Tier.SMALL and reason == lifecycle.REFUSED_ESCALATION_PENDING:
            # The small attempt ended in an escalation but the worker may have died before it
            # published the frontier message: publish it again (the frontier side dedupes).
            job = self.store.get(job_id)
            if job.status is JobStatus.ESCALATED:
                self.publisher.publish_escalation(job)
        log.info("job %s: %s delivery not run (%s)", job_id, tier.value, reason)

    def _apply(self, ctx: AttemptContext, change: Callable[[Job], Job]) -> Job | None:
        try:
            old, new = self.store.transition(ctx.job.id, change)
        except lifecycle.TransitionRefused as refused:
            log.info("job %s: result of attempt %s dropped (%s)", ctx.job.id, ctx.attempt_number, refused.reason)
            return None
        self._record(old, new)
        ctx.job = new
        if new.status.terminal and new.callback_url:
            self.publisher.publish_webhook(new.id, new.traceparent)
        return new

    def succeed(self, ctx: AttemptContext, *, answer: Any, confidence: float | None, usage: Usage, cost_usd: float,
                verdict: Verdict, estimated_frontier_cost_usd: float | None = None) -> Job | None:
        return self._apply(ctx, lambda j: lifecycle.succeed(
            j, attempt_number=ctx.attempt_number, task_id=ctx.task_id, now=self.clock(), answer=answer,
            confidence=confidence, usage=usage, cost_usd=cost_usd, verdict=verdict,
            estimated_frontier_cost_usd=estimated_frontier_cost_usd))

    def escalate(self, ctx: AttemptContext, *, reasons: list[str], answer: Any = None,
                 confidence: float | None = None, usage: Usage | None = None, verdict: Verdict | None = None,
                 error: ErrorInfo | None = None, estimated_frontier_cost_usd: float | None = None) -> Job | None:
        new = self._apply(ctx, lambda j: lifecycle.escalate(
            j, attempt_number=ctx.attempt_number, task_id=ctx.task_id, now=self.clock(), reasons=reasons,
            answer=answer, confidence=confidence, usage=usage, verdict=verdict, error=error,
            estimated_frontier_cost_usd=estimated_frontier_cost_usd))
        if new is not None:
            self.publisher.publish_escalation(new)
        return new

    def fail(self, ctx: AttemptContext, *, error: ErrorInfo, answer: Any = None, confidence: float | None = None,
             usage: Usage | None = None, cost_usd: float = 0.0, billed: bool = False,
             verdict: Verdict | None = None, estimated_frontier_cost_usd: float | None = None) -> Job | None:
        return self._apply(ctx, lambda j: lifecycle.fail(
            j, attempt_number=ctx.attempt_number, task_id=ctx.task_id, now=self.clock(), error=error, answer=answer,
            confidence=confidence, usage=usage, cost_usd=cost_usd, billed=billed, verdict=verdict,
            estimated_frontier_cost_usd=estimated_frontier_cost_usd))

    def reject_and_retry(self, ctx: AttemptContext, *, answer: Any, confidence: float | None, usage: Usage,
                         cost_usd: float, verdict: Verdict) -> Job | None:
        new = self._apply(ctx, lambda j: lifecycle.reject_and_retry(
            j, attempt_number=ctx.attempt_number, task_id=ctx.task_id, now=self.clock(), answer=answer,
            confidence=confidence, usage=usage, cost_usd=cost_usd, verdict=verdict, model=ctx.task.frontier.model,
            worker=self.worker_name, lease_s=self.lease_s))
        if new is not None:
            ctx.attempt_number = new.attempts[-1].number
        return new

    def still_wanted(self, ctx: AttemptContext) -> bool:
        """False once the job was cancelled (or taken over): the worker should stop spending on it."""
        try:
            job = self.store.get(ctx.job.id)
        except JobNotFound:
            return False
        attempt = job.open_attempt()
        return (job.status is JobStatus.RUNNING and attempt is not None
                and attempt.number == ctx.attempt_number and attempt.task_id == ctx.task_id)

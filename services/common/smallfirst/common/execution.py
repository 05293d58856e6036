"""How a worker runs one delivery of a job: claim an attempt (`begin`), then end it exactly once
(`finish`, which applies the outcome function of `smallfirst.common.outcome`).

Both worker pools use this; what differs between them (calling the inference service or the
frontier API) stays in their executors, which return an `AttemptResult`. A refused transition (the
job was cancelled meanwhile, or another delivery owns it) is a logged no-op, so a late answer never
overwrites a cancel and a duplicate delivery never runs twice.

Every transition the store accepts is counted in the job metrics (with the record before and after
it, so each is counted exactly once) and described on the current span (the worker's job span).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from smallfirst.common import lifecycle
from smallfirst.common.budgets import BudgetLedger, BudgetState
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.errors import ConfigurationError
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import Job, JobStatus, Tier
from smallfirst.common.metrics import JobMetrics, default_job_metrics
from smallfirst.common.outcome import Application, AttemptResult, Outcome, OutcomeKind, apply, decide
from smallfirst.common.queues import Publisher
from smallfirst.common.store import Effects, JobNotFound, JobStore
from smallfirst.common.telemetry import annotate_job

log = logging.getLogger(__name__)


class TaskNotInCatalog(ConfigurationError):
    """A job names a task this worker's catalog does not have (catalogs out of step between pods).

    Final: the job fails with this code rather than loop until the catalogs agree."""

    code = "task_not_in_catalog"


@dataclass
class AttemptContext:
    job: Job
    task: Task
    tier: Tier
    attempt_number: int
    task_id: str


class LeaseKeeper:
    """Renews, from one thread per process, the leases of the attempts this process is running.

    A lease is what keeps the sweeper and redeliveries away from a running attempt; it must be
    short, so that a dead worker's job is taken over quickly, and yet never run out under an
    attempt that is merely slow (the first classify job of a worker embeds the task's labels; a
    frontier answer can take minutes). So a held attempt's lease is pushed forward every third of
    its length; once the attempt ends (or this process dies) renewals stop and the lease runs out.
    A renewal the store refuses (the attempt ended, the job was cancelled or taken over) drops the
    attempt from the set; one that fails on Redis is tried again on the next round.
    """

    def __init__(self, store: JobStore, *, lease_s: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.lease_s = lease_s
        self.interval_s = lease_s / 3
        self.clock = clock
        self._held: dict[int, AttemptContext] = {}
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(self, ctx: AttemptContext) -> Iterator[None]:
        with self._guard:
            self._held[id(ctx)] = ctx
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._guard:
                self._held.pop(id(ctx), None)

    def held(self) -> int:
        with self._guard:
            return len(self._held)

    def renew_all(self) -> None:
        with self._guard:
            held = list(self._held.items())
        for key, ctx in held:
            try:
                self.store.transition(ctx.job.id, self._renewal(ctx))
            except lifecycle.TransitionRefused as refused:
                log.info("job %s: lease of attempt %s not renewed (%s)", ctx.job.id, ctx.attempt_number,
                         refused.reason)
                with self._guard:
                    self._held.pop(key, None)
            except JobNotFound:
                with self._guard:
                    self._held.pop(key, None)
            except Exception:  # Redis down: the next round tries again, within the lease's slack
                log.warning("job %s: lease renewal failed", ctx.job.id, exc_info=True)

    def _renewal(self, ctx: AttemptContext) -> Callable[[Job], Job]:
        def renew(job: Job) -> Job:
            return lifecycle.renew_lease(job, attempt_number=ctx.attempt_number, task_id=ctx.task_id,
                                         now=self.clock(), lease_s=self.lease_s)
        return renew

    def _loop(self) -> None:
        while True:
            time.sleep(self.interval_s)
            self.renew_all()


class JobExecution:
    def __init__(self, store: JobStore, publisher: Publisher, catalog: Catalog, *, lease_s: float,
                 worker_name: str | None = None, clock: Callable[[], float] = time.time,
                 metrics: JobMetrics | None = None, budgets: BudgetLedger | None = None,
                 examples: ExampleMemory | None = None) -> None:
        self.store = store
        # Tenants' frontier budgets, an input of the outcome function (None: budgets not enforced).
        self.budgets = budgets
        self.publisher = publisher
        self.catalog = catalog
        self.lease_s = lease_s
        self.worker_name = worker_name or socket.gethostname()
        self.clock = clock
        # The process's set on the default registry (what the pool's metrics server serves) unless given.
        self.metrics = default_job_metrics() if metrics is None else metrics
        # Where frontier answers of tasks that learn are kept (None: nothing is learned here).
        self.examples = examples
        self.leases = LeaseKeeper(store, lease_s=lease_s, clock=clock)

    @contextmanager
    def claimed(self, job_id: str, tier: Tier, task_id: str) -> Iterator[AttemptContext | None]:
        """`begin`, then hold the attempt's lease for as long as the block runs (see LeaseKeeper).

        Workers run attempts inside this block, so that a slow attempt keeps its job and a dead
        worker's job is taken over once its lease runs out."""
        ctx = self.begin(job_id, tier, task_id)
        if ctx is None:
            yield None
            return
        with self.leases.hold(ctx):
            yield ctx

    def _record(self, before: Job, after: Job) -> None:
        self.metrics.record_job_transition(before, after)
        annotate_job(after)

    def begin(self, job_id: str, tier: Tier, task_id: str, *, lease_s: float | None = None, batched: bool = False,
              effects: Effects | None = None) -> AttemptContext | None:
        """Claim an attempt for this delivery, or None when there is nothing for it to do.

        `lease_s` overrides the pool's lease (a batched attempt waits for its batch); `effects` are
        written in the same transaction as the claim (a batched attempt's request enters the buffer
        then, or never)."""
        tasks: list[Task] = []

        def begin_attempt(job: Job) -> Job:
            # The task is looked up on the record the transition reads: one read of the job, not two.
            task = self.catalog.get(job.task)
            if task is None:
                raise TaskNotInCatalog(f"job {job_id}: task {job.task!r} is not in this worker's catalog")
            tasks.append(task)
            model = task.small.model if tier is Tier.SMALL else task.frontier.model
            return lifecycle.begin_attempt(job, tier=tier, model=model, worker=self.worker_name, task_id=task_id,
                                           now=self.clock(), lease_s=self.lease_s if lease_s is None else lease_s,
                                           batched=batched)

        try:
            old, new = self.store.transition(job_id, begin_attempt, effects=effects)
        except JobNotFound:
            log.warning("job %s: not found (expired or never stored); dropping its message", job_id)
            return None
        except lifecycle.TransitionRefused as refused:
            self._on_refused_begin(job_id, tier, refused.reason)
            return None
        self._record(old, new)
        task = tasks[-1]
        attempt = new.attempts[-1]
        return AttemptContext(job=new, task=task, tier=tier, attempt_number=attempt.number, task_id=task_id)

    def _on_refused_begin(self, job_id: str, tier: Tier, reason: str) -> None:
        if tier is Tier.SMALL and reason == lifecycle.REFUSED_ESCALATION_PENDING:
            # The small attempt ended in an escalation but the worker may have died before it
            # published the frontier message: publish it again (the frontier side dedupes).
            job = self.store.get(job_id)
            if job.status is JobStatus.ESCALATED:
                self.publisher.publish_escalation(job)
        log.info("job %s: %s delivery not run (%s)", job_id, tier.value, reason)

    def budget_for(self, ctx: AttemptContext, result: AttemptResult) -> BudgetState | None:
        """The tenant's budget, read only when the outcome could call the frontier (a frontier attempt,
        or a small answer that is not a pass): a passing small answer costs no read."""
        if self.budgets is None or ctx.job.local_only:
            return None
        if ctx.tier is Tier.SMALL and result.verdict is not None and result.verdict.passed:
            return None
        return self.budgets.state(ctx.job.tenant, self.clock())

    def _confirm_published(self, job_id: str) -> None:
        """Drop the outbox entry the transition wrote, now that its message is out."""
        try:
            self.store.published([job_id])
        except redis.RedisError as exc:
            # The message is out: a leftover entry only makes the sweeper send a harmless duplicate.
            log.warning("job %s: message published, outbox entry not removed (%s)", job_id, exc)

    def finish(self, ctx: AttemptContext, result: AttemptResult, *, effects: Effects | None = None,
               lease_s: float | None = None) -> Outcome:
        """End the attempt with `result`: decide its outcome on the freshest record, store it with one
        compare-and-set, then publish what follows (the escalation, the delayed retry, the webhook).

        The one place an attempt's outcome is applied. A STOP (the job was cancelled meanwhile, or
        another delivery took it over) writes nothing. After a REASK, `ctx` names the new attempt.
        `effects` are written in the same transaction as the outcome (and not at all on a STOP);
        `lease_s` is the lease of a re-ask's attempt (the pool's by default).
        """
        decided: list[Outcome] = []
        budget = self.budget_for(ctx, result)

        def change(job: Job) -> Job:
            now = self.clock()
            outcome = decide(job, ctx.task, ctx.tier, result, attempt_number=ctx.attempt_number,
                             task_id=ctx.task_id, now=now, budget=budget)
            decided.append(outcome)
            return apply(job, outcome, result, attempt_number=ctx.attempt_number, task_id=ctx.task_id, now=now,
                         application=Application(worker=self.worker_name, model=ctx.task.frontier.model,
                                                 lease_s=self.lease_s if lease_s is None else lease_s))

        try:
            # From the record this delivery wrote last: no read unless someone wrote the job since.
            old, new = self.store.transition(ctx.job.id, change, expected=ctx.job, effects=effects)
        except lifecycle.TransitionRefused as refused:
            log.info("job %s: result of attempt %s dropped (%s)", ctx.job.id, ctx.attempt_number, refused.reason)
            return decided[-1] if decided else Outcome(OutcomeKind.STOP, reasons=(refused.reason,))
        outcome = decided[-1]
        self._record(old, new)
        ctx.job = new
        if outcome.kind is OutcomeKind.ESCALATE:
            # A delay: the tenant's budget is spent and its policy holds escalations.
            self.publisher.publish_escalation(new, countdown_s=outcome.retry_in_s or None)
        elif outcome.kind is OutcomeKind.RETRY:
            log.warning("job %s: %s tier attempt %s failed (%s); retrying in %.1f s", new.id, ctx.tier.value,
                        ctx.attempt_number, ", ".join(outcome.reasons), outcome.retry_in_s)
            if new.status is JobStatus.ESCALATED:
                self.publisher.publish_escalation(new, countdown_s=outcome.retry_in_s)
            else:
                self.publisher.publish_job(new, countdown_s=outcome.retry_in_s)
        elif outcome.kind is OutcomeKind.REASK:
            ctx.attempt_number = new.attempts[-1].number
        if outcome.kind in (OutcomeKind.ESCALATE, OutcomeKind.RETRY):
            self._confirm_published(new.id)
        if outcome.kind is OutcomeKind.SUCCEED and outcome.learn:
            self._learn(ctx, new)
        if outcome.kind is OutcomeKind.SUCCEED and outcome.shadow:
            self.publisher.publish_shadow(new)
        if new.status.terminal and new.callback_url:
            self.publisher.publish_webhook(new.id, new.traceparent)
        return outcome

    def _learn(self, ctx: AttemptContext, job: Job) -> None:
        """Keep the frontier's answer as a training example. After the job's result is stored: a
        failure here costs one example, never the job (a redelivery finds the job ended)."""
        if self.examples is None or not isinstance(job.result, dict):
            return
        label = job.result.get("label")
        if not isinstance(label, str):
            return
        try:
            self.examples.record(ctx.task, job, label, ExampleSource.FRONTIER, model=ctx.task.frontier.model)
        except Exception:
            log.exception("job %s: its frontier answer could not be kept as an example", job.id)

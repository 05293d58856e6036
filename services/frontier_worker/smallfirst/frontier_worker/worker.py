"""The frontier worker pool: Celery tasks that run jobs routed to the frontier tier and every
escalated job, through the Anthropic SDK. Webhook deliveries run on a pool of their own
(smallfirst.common.delivery), so that a slow receiver never holds one of these threads."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from celery import Celery, signals

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.execution import AttemptContext, JobExecution
from smallfirst.common.jobs import Tier
from smallfirst.common.outcome import AttemptResult, OutcomeKind
from smallfirst.common.pricing import load_price_table
from smallfirst.common.queues import make_celery
from smallfirst.common.validation import validate
from smallfirst.common.worker_app import (
    PoolBootstrap,
    build_execution,
    install_pool_runtime,
    pool_redis,
    register_job_task,
)
from smallfirst.frontier_worker.batch_lane import BatchLane, BatchLaneThread, BatchPolicy, kill_at
from smallfirst.frontier_worker.batches import BatchBuffer, BatchPoller, ResultHandler
from smallfirst.frontier_worker.cancellation import CancelWatcher
from smallfirst.frontier_worker.client import batch_config, build_anthropic_client, build_executor
from smallfirst.frontier_worker.executor import EscalationContext, FrontierExecutor
from smallfirst.frontier_worker.settings import FrontierWorkerSettings
from smallfirst.frontier_worker.shadow import ShadowRunner

log = logging.getLogger(__name__)


def escalation_context(ctx: AttemptContext) -> EscalationContext | None:
    small = [a for a in ctx.job.attempts if a.tier is Tier.SMALL and a.ended_at is not None]
    if not small:
        return None
    return EscalationContext(small_answer=small[-1].answer, reasons=list(ctx.job.escalation_reasons))


@dataclass
class FrontierRuntime:
    execution: JobExecution
    executor: FrontierExecutor
    # Answers shadow samples (None: this runtime takes none).
    shadow: ShadowRunner | None = None
    # Cuts the call of a job cancelled while it is in flight (None: a cancel waits for the call to end).
    cancels: CancelWatcher | None = None
    batches: BatchLane | None = None

    def run(self, job_id: str, task_id: str) -> None:
        if self.batches is not None and self.batches.wants(job_id):
            # Claimed and buffered in one transaction; the batch's result ends the attempt.
            self.batches.submit(job_id, task_id)
            return
        with self.execution.claimed(job_id, Tier.FRONTIER, task_id) as ctx:
            if ctx is None:
                return
            escalation = escalation_context(ctx)
            # A re-ask (the answer failed validation and the task allows another try) runs in this
            # same delivery, under the same held lease; every other outcome ends it.
            spent = False
            while True:
                result = self.refused_by_budget(ctx) or self.attempt(ctx.task, ctx.job.input, escalation, job_id)
                spent = spent or result.cost_usd > 0
                if self.execution.finish(ctx, result).kind is not OutcomeKind.REASK:
                    break
        if spent and self.execution.budgets is not None:
            self.execution.budgets.warn_if_near(ctx.job.tenant, time.time())

    def refused_by_budget(self, ctx: AttemptContext) -> AttemptResult | None:
        """The tenant's frontier budget is spent: no call; the outcome function applies its policy."""
        if self.execution.budgets is None:
            return None
        state = self.execution.budgets.state(ctx.job.tenant, time.time())
        if state is None or not state.exceeded:
            return None
        log.info("job %s: tenant %s is past its frontier budget (policy %s); the frontier is not called",
                 ctx.job.id, ctx.job.tenant, state.policy.value)
        if self.execution.budgets.metrics is not None:
            self.execution.budgets.metrics.refused.labels(ctx.job.tenant, state.policy.value).inc()
        return AttemptResult.failed(state.error())

    def attempt(self, task: Task, job_input: dict[str, str], escalation: EscalationContext | None,
                job_id: str | None = None) -> AttemptResult:
        try:
            with self._cancel_watch(job_id) as cancelled:
                answer = self.executor.run(task, job_input, escalation, cancelled)
        except SmallfirstError as exc:
            return AttemptResult.failed(exc)
        with telemetry.validation_span(Tier.FRONTIER.value) as span:
            verdict = validate(task, answer.answer, None, job_input, tier=Tier.FRONTIER)
            telemetry.annotate_verdict(verdict, span)
        return AttemptResult(answer=answer.answer, usage=answer.usage, cost_usd=answer.cost_usd, verdict=verdict)


    def _cancel_watch(self, job_id: str | None) -> AbstractContextManager[threading.Event | None]:
        if self.cancels is None or job_id is None:
            return nullcontext(None)
        clients = self.executor.thread_clients
        return self.cancels.watch(job_id, clients.current()[1] if clients is not None else None)


def build_runtime(settings: FrontierWorkerSettings, app: Celery) -> FrontierRuntime:
    """The pool's bootstrap: one Redis client for the store and the shared rate limiter, the
    Anthropic client, the price table and the catalog, each loaded (and so checked) here."""
    client = pool_redis(settings)
    execution = build_execution(settings, app, client)
    executor = build_executor(settings, client)
    batches = build_batch_lane(settings, execution)
    # Shadow samples whose jobs say `auto` go into the same batch buffer; their results come back
    # through the lane, which hands them to the runner.
    shadow = ShadowRunner(execution.store, execution.catalog, executor, client, batches=batches.buffer)
    batches.shadow_recorder = shadow.record
    return FrontierRuntime(execution=execution, executor=executor, shadow=shadow,
                           cancels=CancelWatcher(client, poll_interval_s=settings.frontier_cancel_poll_s),
                           batches=batches)


def build_batch_lane(settings: FrontierWorkerSettings, execution: JobExecution) -> BatchLane:
    config = batch_config(settings)
    sdk = build_anthropic_client(settings)
    pause = kill_at(settings.frontier_batch_kill_at, settings.frontier_batch_kill_after)
    redis_client = execution.store.redis

    def make_poller(handle: ResultHandler) -> BatchPoller:
        return BatchPoller(redis_client, sdk, handle, config, pause=pause)

    return BatchLane(execution, BatchBuffer(redis_client, sdk, config, pause=pause),
                     load_price_table(settings.prices_path),
                     BatchPolicy(lease_s=settings.frontier_batch_lease_s, max_tries=settings.frontier_batch_max_tries,
                                 min_time_left_s=settings.frontier_batch_min_time_left_s),
                     make_poller=make_poller)


def make_worker_app(settings: FrontierWorkerSettings) -> Celery:
    app = make_celery(settings)
    runtime: PoolBootstrap[FrontierRuntime] = PoolBootstrap(k.POOL_FRONTIER, lambda: build_runtime(settings, app))
    register_job_task(app, k.TASK_RUN_FRONTIER, Tier.FRONTIER, runtime.get)

    @app.task(name=k.TASK_RUN_SHADOW)
    def run_shadow(job_id: str) -> None:
        shadow = runtime.get().shadow
        if shadow is not None:
            shadow.run(job_id)

    install_pool_runtime(app, settings, k.POOL_FRONTIER, runtime, metrics_port=settings.metrics_port,
                         execution_of=lambda built: built.execution)
    lane_threads: list[BatchLaneThread] = []

    @signals.worker_ready.connect(weak=False)
    def start_batch_lane(**_: object) -> None:
        lane = runtime.get().batches
        if lane is not None:
            thread = BatchLaneThread(lane, settings.frontier_batch_poll_interval_s)
            thread.start()
            lane_threads.append(thread)

    @signals.worker_shutdown.connect(weak=False)
    def stop_batch_lane(**_: object) -> None:
        for thread in lane_threads:
            thread.stop()

    return app

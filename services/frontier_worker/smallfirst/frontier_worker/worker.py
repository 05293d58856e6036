"""The frontier worker pool: Celery tasks that run jobs routed to the frontier tier and every
escalated job, through the Anthropic SDK; and the webhook deliveries."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from celery import Celery

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.delivery import register_webhook_task
from smallfirst.common.execution import AttemptContext, JobExecution
from smallfirst.common.jobs import ErrorInfo, Tier
from smallfirst.common.queues import make_celery
from smallfirst.common.validation import validate
from smallfirst.common.worker_app import Lazy, build_execution, install_pool_runtime, register_job_task
from smallfirst.frontier_worker.executor import EscalationContext, FrontierError, FrontierExecutor
from smallfirst.frontier_worker.settings import FrontierWorkerSettings, build_executor

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

    def run(self, job_id: str, task_id: str) -> None:
        ctx = self.execution.begin(job_id, Tier.FRONTIER, task_id)
        if ctx is None:
            return
        escalation = escalation_context(ctx)
        retries_left = ctx.task.frontier.max_validation_retries
        while True:
            try:
                answer = self.executor.run(ctx.task, ctx.job.input, escalation)
            except FrontierError as exc:
                self.execution.fail(ctx, error=ErrorInfo(code=exc.code, message=str(exc)))
                return
            with telemetry.validation_span(Tier.FRONTIER.value) as span:
                verdict = validate(ctx.task, answer.answer, None, ctx.job.input, tier=Tier.FRONTIER)
                telemetry.annotate_verdict(verdict, span)
            if verdict.passed:
                self.execution.succeed(ctx, answer=answer.answer, confidence=None, usage=answer.usage,
                                       cost_usd=answer.cost_usd, verdict=verdict)
                return
            if retries_left == 0:
                self.execution.fail(
                    ctx, error=ErrorInfo(code="validation_failed",
                                         message="the frontier answer failed validation after every retry",
                                         details={"reasons": verdict.reasons}),
                    answer=answer.answer, usage=answer.usage, cost_usd=answer.cost_usd, billed=True, verdict=verdict)
                return
            retries_left -= 1
            if self.execution.reject_and_retry(ctx, answer=answer.answer, confidence=None, usage=answer.usage,
                                               cost_usd=answer.cost_usd, verdict=verdict) is None:
                return  # cancelled while it ran: stop spending on it


def make_worker_app(settings: FrontierWorkerSettings) -> Celery:
    app = make_celery(settings)

    def build() -> FrontierRuntime:
        execution = build_execution(settings, app)
        return FrontierRuntime(execution=execution, executor=build_executor(settings, execution.store.redis))

    runtime: Lazy[FrontierRuntime] = Lazy(build)

    register_job_task(app, k.TASK_RUN_FRONTIER, Tier.FRONTIER, runtime.get)

    # This pool also consumes the webhooks queue (constants.POOL_QUEUES).
    register_webhook_task(app, settings)
    # httpx: the webhook deliveries' client spans (the anthropic SDK traces its own calls).
    install_pool_runtime(app, settings, k.POOL_FRONTIER, Lazy(lambda: runtime.get().execution),
                         metrics_port=settings.metrics_port, instrument=[telemetry.instrument_httpx])
    return app

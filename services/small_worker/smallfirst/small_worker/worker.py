"""The small-tier worker pool: Celery tasks that run jobs on the self-hosted models.

The pool runs Celery's threads pool with many threads per process, so that many jobs are in
flight at once and the inference service's continuous batching fills its batches; each thread
blocks on one gRPC call. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis
from celery import Celery
from pydantic import Field

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import Task
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import ErrorInfo, Tier
from smallfirst.common.pricing import PriceTable, PricingError, UnknownModelPrice, load_price_table
from smallfirst.common.prompts import estimate_frontier_usage
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.validation import validate
from smallfirst.common.worker_app import Lazy, build_execution, install_pool_runtime, register_job_task
from smallfirst.small_worker.executor import SmallTierExecutor
from smallfirst.small_worker.inference_client import InferenceClient, InferenceError

log = logging.getLogger(__name__)


class SmallWorkerSettings(CoreSettings):
    # Served model name -> gRPC target, e.g. {"all-minilm-l6-v2": "dns:///inference-embed:50051"}.
    inference_targets: dict[str, str]
    # Threads per worker process: jobs in flight at once (each waits on one inference call).
    concurrency: int = Field(default=32, gt=0)
    # Prometheus metrics of this process (job transitions, escalations, latencies); 0: none.
    metrics_port: int = Field(default=k.DEFAULT_METRICS_PORT_SMALL_WORKER, ge=0, le=65535)
    # Prices used to estimate what the frontier tier would have charged (savings reporting).
    prices_path: str | None = None


@dataclass
class SmallRuntime:
    execution: JobExecution
    executor: SmallTierExecutor
    prices: PriceTable

    def run(self, job_id: str, task_id: str) -> None:
        ctx = self.execution.begin(job_id, Tier.SMALL, task_id)
        if ctx is None:
            return
        try:
            answer = self.executor.run(ctx.task, ctx.job.input)
        except InferenceError as exc:
            error = ErrorInfo(code=exc.code, message=str(exc))
            if ctx.local_only:
                self.execution.fail(ctx, error=error)
            else:
                self.execution.escalate(ctx, reasons=[f"small_tier_error: {exc.code}: {exc}"], error=error)
            return
        with telemetry.validation_span(Tier.SMALL.value) as span:
            verdict = validate(ctx.task, answer.answer, answer.confidence, ctx.job.input)
            telemetry.annotate_verdict(verdict, span)
        estimate = self._estimate_frontier_cost(ctx.task, ctx.job.input, answer.answer)
        if verdict.passed:
            self.execution.succeed(ctx, answer=answer.answer, confidence=answer.confidence, usage=answer.usage,
                                   cost_usd=0.0, verdict=verdict, estimated_frontier_cost_usd=estimate)
        elif ctx.local_only:
            self.execution.fail(
                ctx, error=ErrorInfo(code="validation_failed",
                                     message="the small tier's answer failed validation and the job is local-only",
                                     details={"reasons": verdict.reasons}),
                answer=answer.answer, confidence=answer.confidence, usage=answer.usage, billed=True, verdict=verdict)
        else:
            self.execution.escalate(ctx, reasons=verdict.reasons, answer=answer.answer, confidence=answer.confidence,
                                    usage=answer.usage, verdict=verdict)

    def _estimate_frontier_cost(self, task: Task, job_input: dict[str, str], answer: object) -> float | None:
        try:
            return self.prices.cost_usd(task.frontier.model, estimate_frontier_usage(task, job_input, answer))
        except UnknownModelPrice:
            return None


def build_runtime(settings: SmallWorkerSettings, app: Celery) -> SmallRuntime:
    execution = build_execution(settings, app)
    client = InferenceClient(settings.inference_targets)
    cache = redis.Redis.from_url(settings.redis_url)
    try:
        prices = load_price_table(settings.prices_path)
    except PricingError as exc:
        raise SystemExit(f"cannot load prices: {exc}") from exc
    return SmallRuntime(execution=execution, executor=SmallTierExecutor(client, cache), prices=prices)


def make_worker_app(settings: SmallWorkerSettings) -> Celery:
    app = make_celery(settings)
    runtime: Lazy[SmallRuntime] = Lazy(lambda: build_runtime(settings, app))

    register_job_task(app, k.TASK_RUN_SMALL, Tier.SMALL, runtime.get)

    # gRPC client spans carry the trace to the inference service; its channels are created after this runs.
    install_pool_runtime(app, settings, k.POOL_SMALL, Lazy(lambda: runtime.get().execution),
                         metrics_port=settings.metrics_port, instrument=[telemetry.instrument_grpc_client])
    return app

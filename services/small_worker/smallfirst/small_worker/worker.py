"""The small-tier worker pool: Celery tasks that run jobs on the self-hosted models.

The pool runs Celery's threads pool with many threads per process, so that many jobs are in
flight at once and the inference service's continuous batching fills its batches; each thread
blocks on one gRPC call. Nothing here imports torch or vLLM.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from celery import Celery, signals
from pydantic import Field

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.examples import learns_from
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import Tier
from smallfirst.common.outcome import AttemptResult
from smallfirst.common.pricing import PriceTable, PricingError, UnknownModelPrice, load_price_table
from smallfirst.common.prompts import estimate_frontier_usage
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.validation import validate
from smallfirst.common.worker_app import (
    PoolBootstrap,
    build_execution,
    install_pool_runtime,
    pool_redis,
    register_job_task,
    register_jobs_task,
)
from smallfirst.small_worker.coalescer import CoalescerSettings, EmbedCoalescer
from smallfirst.small_worker.executor import SmallTierExecutor
from smallfirst.small_worker.inference_client import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ChannelTls,
    InferenceClient,
    channel_options,
)
from smallfirst.small_worker.learning_metrics import record_training
from smallfirst.small_worker.native_threads import limit_native_threads, register_native_threads_collector
from smallfirst.small_worker.trainer import Trainer, TrainerThread, TrainingProcess

log = logging.getLogger(__name__)


class SmallWorkerSettings(CoreSettings):
    # Served model name -> gRPC target, e.g. {"all-minilm-l6-v2": "dns:///inference-embed:50051"}.
    inference_targets: dict[str, str]
    # TLS to the inference service (its server has tls_cert_file set): the CA of its certificate
    # ("" with inference_tls true: the system's CAs), and a client certificate for mutual TLS.
    inference_tls: bool = False
    inference_tls_ca_file: str | None = None
    inference_tls_cert_file: str | None = None
    inference_tls_key_file: str | None = None
    # gRPC message size limit; the server's default is the same (InferenceSettings.max_message_bytes).
    inference_max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    # Threads per worker process: jobs in flight at once (each waits on one inference call).
    concurrency: int = Field(default=32, gt=0)
    # Threads that run the jobs of multi-job messages (`small_jobs_per_message`), shared by the
    # messages in flight: at most this many of their jobs run at once. More jobs in flight make the
    # coalesced Embed calls bigger: 16.6 texts a call with 64 against 9.2 with 32 on the 2-core bench.
    message_job_threads: int = Field(default=64, gt=0)
    # Prometheus metrics of this process (job transitions, escalations, latencies); 0: none.
    metrics_port: int = Field(default=k.DEFAULT_METRICS_PORT_SMALL_WORKER, ge=0, le=65535)
    # Prices used to estimate what the frontier tier would have charged (savings reporting).
    prices_path: str | None = None
    # Train the heads of tasks that learn in this pool (one trainer per task at a time, under a lock).
    trainer_enabled: bool = True
    # How often the trainer looks for tasks with enough new examples.
    trainer_interval_s: float = Field(default=5.0, gt=0)
    # Threads of each native pool (BLAS, OpenMP) of the process: the job threads are its parallelism.
    native_threads: int = Field(default=1, gt=0)
    # Coalescing of the jobs' Embed calls (coalescer.py): texts per call, how long the first text of a
    # batch may wait for others while a call is in flight, and calls in flight at once. Two calls
    # in flight: one runs while the next batch gathers, and batches grow with the load (on the
    # 2-core bench, 250-287 jobs/s with 2, 243 with 4 and 181-200 with 1: each call and each engine
    # step cost the inference service a fixed overhead, and a lone call leaves it idle between).
    embed_coalesce_max_batch: int = Field(default=64, gt=0)
    embed_coalesce_max_wait_s: float = Field(default=0.003, ge=0)
    embed_coalesce_max_in_flight: int = Field(default=2, gt=0)
    # Build the catalog's label indexes when the worker starts instead of on each task's first job.
    warm_label_indexes: bool = True


@dataclass
class SmallRuntime:
    execution: JobExecution
    executor: SmallTierExecutor
    prices: PriceTable
    trainer: Trainer
    # The child process the trainer's fits run in (started with the trainer thread, closed with it).
    training: TrainingProcess
    # Where the jobs of a multi-job message run (`register_jobs_task`).
    job_threads: ThreadPoolExecutor

    def run(self, job_id: str, task_id: str) -> None:
        with self.execution.claimed(job_id, Tier.SMALL, task_id) as ctx:
            if ctx is not None:
                self.execution.finish(ctx, self.attempt(ctx.task, ctx.job.input,
                                                        learn=learns_from(ctx.job, ctx.task)))

    def attempt(self, task: Task, job_input: dict[str, str], *, learn: bool = True) -> AttemptResult:
        """Answer on the small tier and judge the answer; what that means is the outcome function's."""
        try:
            answer = self.executor.run(task, job_input, learn=learn)
        except SmallfirstError as exc:
            return AttemptResult.failed(exc)
        with telemetry.validation_span(Tier.SMALL.value) as span:
            verdict = validate(task, answer.answer, answer.confidence, job_input, gate=answer.gate)
            telemetry.annotate_verdict(verdict, span)
        estimate = self._estimate_frontier_cost(task, job_input, answer.answer) if verdict.passed else None
        return AttemptResult(answer=answer.answer, confidence=answer.confidence, usage=answer.usage, cost_usd=0.0,
                             estimated_frontier_cost_usd=estimate, verdict=verdict)

    def _estimate_frontier_cost(self, task: Task, job_input: dict[str, str], answer: object) -> float | None:
        try:
            return self.prices.cost_usd(task.frontier.model, estimate_frontier_usage(task, job_input, answer))
        except UnknownModelPrice:
            return None


def build_runtime(settings: SmallWorkerSettings, app: Celery) -> SmallRuntime:
    """The pool's bootstrap: one Redis client for the store and the label cache, the gRPC channels,
    the price table and the catalog, each loaded (and so checked) here. First of all the native
    thread pools are capped, before any job thread runs a matrix product."""
    limit_native_threads(settings.native_threads)
    register_native_threads_collector()
    client = pool_redis(settings)
    execution = build_execution(settings, app, client)
    try:
        prices = load_price_table(settings.prices_path)
    except PricingError as exc:
        raise PricingError(f"cannot load prices from {settings.prices_path or 'the embedded table'}: {exc}") from exc
    tls = (ChannelTls.from_files(settings.inference_tls_ca_file, settings.inference_tls_cert_file,
                                 settings.inference_tls_key_file)
           if settings.inference_tls or settings.inference_tls_ca_file else None)
    inference = InferenceClient(settings.inference_targets, tls=tls,
                                options=channel_options(settings.inference_max_message_bytes))
    coalescer = EmbedCoalescer(
        lambda model, texts, timeout_s: inference.embed(model, texts, truncate=True, timeout_s=timeout_s),
        CoalescerSettings(max_batch=settings.embed_coalesce_max_batch, max_wait_s=settings.embed_coalesce_max_wait_s,
                          max_in_flight=settings.embed_coalesce_max_in_flight))
    executor = SmallTierExecutor(inference, client, coalescer=coalescer)
    if settings.warm_label_indexes:
        # In the background: the worker takes jobs meanwhile; a job of a task being warmed waits for
        # that task's index (one build per task and process), as it would have built it itself.
        threading.Thread(target=executor.warm_label_indexes, args=(execution.catalog.tasks(),),
                         name="warm-label-indexes", daemon=True).start()
    # The trainer's fits run in a child process (TrainingProcess), off this process's interpreter lock.
    training = TrainingProcess()
    return SmallRuntime(execution=execution, executor=executor, prices=prices,
                        trainer=Trainer(client, inference, fit=training), training=training,
                        job_threads=ThreadPoolExecutor(settings.message_job_threads, thread_name_prefix="job"))


def make_worker_app(settings: SmallWorkerSettings) -> Celery:
    app = make_celery(settings)
    runtime: PoolBootstrap[SmallRuntime] = PoolBootstrap(k.POOL_SMALL, lambda: build_runtime(settings, app))
    register_job_task(app, k.TASK_RUN_SMALL, Tier.SMALL, runtime.get)
    register_jobs_task(app, k.TASK_RUN_SMALL_MANY, Tier.SMALL, runtime.get, lambda: runtime.get().job_threads)
    # gRPC client spans carry the trace to the inference service; its channels are created after this runs.
    install_pool_runtime(app, settings, k.POOL_SMALL, runtime, metrics_port=settings.metrics_port,
                         instrument=[telemetry.instrument_grpc_client], execution_of=lambda built: built.execution)
    if settings.trainer_enabled:
        install_trainer(runtime, settings.trainer_interval_s)
    return app


def install_trainer(runtime: PoolBootstrap[SmallRuntime], interval_s: float) -> None:
    """The trainer thread of this process, started once the worker is ready (off the job threads)."""
    threads: list[TrainerThread] = []

    @signals.worker_ready.connect(weak=False)
    def start_trainer(**_: object) -> None:
        built = runtime.get()
        built.training.start()
        thread = TrainerThread(built.trainer, built.execution.catalog, interval_s=interval_s,
                               on_report=record_training)
        thread.start()
        threads.append(thread)

    @signals.worker_shutdown.connect(weak=False)
    def stop_trainer(**_: object) -> None:
        for thread in threads:
            thread.stop()
        if threads:
            runtime.get().training.close()

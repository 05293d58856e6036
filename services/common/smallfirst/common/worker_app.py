"""What every worker pool shares around its Celery tasks: the bootstrap that builds the per-process
runtime once when the worker starts, retrying on infrastructure errors, the sweeper, the liveness
heartbeat, and the observability of the process (JSON logs, tracing, the Prometheus metrics server)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any, Generic, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import redis
from celery import Celery, bootsteps, signals
from celery import Task as CeleryTask

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.budgets import BudgetLedger, default_budget_metrics
from smallfirst.common.catalog import Catalog, load_catalog
from smallfirst.common.deadletters import REASON_UNDECODABLE, record_undecodable
from smallfirst.common.examples import ExampleMemory
from smallfirst.common.execution import JobExecution
from smallfirst.common.fair import FairQueues
from smallfirst.common.jobs import Tier
from smallfirst.common.metrics import default_job_metrics, start_metrics_server
from smallfirst.common.queues import Publisher
from smallfirst.common.runtime import Dispatcher, DispatcherThread, HeartbeatStep, Sweeper, SweeperThread
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore, StoreConflict

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors of the infrastructure (not of the job): the task gives its message back to the queue with a
# backoff instead of failing the job, so a Redis restart loses nothing.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, StoreConflict)
RETRY_BACKOFF_S = (1, 2, 5, 10, 30, 60)
# Publishing the retry of a delivery while Redis is away: Celery's default policy gives up after about
# a second, and a retry that cannot be published rejects its message for good (Celery's Task.retry
# raises Reject(requeue=False)), leaving the job to the sweeper. Waiting for Redis keeps the message.
RETRY_PUBLISH_POLICY: dict[str, float | int] = {"max_retries": 60, "interval_start": 0.5, "interval_step": 0.5,
                                                  "interval_max": 3.0}

# The service name each pool's traces and logs carry (OTEL_SERVICE_NAME overrides it).
POOL_SERVICE_NAMES: dict[str, str] = {
    k.POOL_SMALL: k.SERVICE_SMALL_WORKER,
    k.POOL_FRONTIER: k.SERVICE_FRONTIER_WORKER,
    k.POOL_WEBHOOKS: k.SERVICE_WEBHOOK_WORKER,
}


class BootstrapError(RuntimeError):
    """The pool's runtime could not be built (bad settings, price file or catalog)."""


class PoolBootstrap(Generic[T]):
    """The one place a pool's process builds its clients (Redis, gRPC, Anthropic) and its runtime.

    `start` runs once, at Celery's `worker_init`: in the process that runs the tasks (the pools run
    Celery's threads pool, so there is no fork after it; gRPC channels and Redis pools must never be
    created before a fork, grpc/grpc#13464), and before the consumer takes a message. A runtime that
    cannot be built stops the process there with the reason, so a bad price file or catalog never
    costs a job.
    """

    def __init__(self, pool: str, build: Callable[[], T]) -> None:
        self.pool = pool
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def start(self) -> T:
        with self._lock:
            if self._value is None:
                try:
                    self._value = self._build()
                except Exception as exc:
                    raise BootstrapError(f"the {self.pool} worker cannot start: {type(exc).__name__}: {exc}") from exc
            return self._value

    def get(self) -> T:
        if self._value is None:
            raise BootstrapError(f"the {self.pool} pool's runtime is used before its worker started")
        return self._value


def pool_redis(settings: CoreSettings) -> redis.Redis:
    """The Redis client of one pool process, shared by its store, caches and limiters (thread-safe:
    one connection pool). Only a pool's bootstrap calls this."""
    return redis.Redis.from_url(settings.redis_url, health_check_interval=10, socket_keepalive=True)


def build_execution(settings: CoreSettings, app: Celery, client: redis.Redis,
                    catalog: Catalog | None = None) -> JobExecution:
    store = JobStore(client, retention_s=settings.job_retention_s, stale_after_s=settings.sweep_stale_after_s)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    publisher = Publisher(app, FairQueues(client) if settings.fair_scheduling else None)
    return JobExecution(store, publisher, catalog or load_catalog(settings.catalog_path),
                        lease_s=settings.job_lease_s, worker_name=worker_name, examples=ExampleMemory(client),
                        budgets=BudgetLedger(client, default_budget_metrics()))


def retry_countdown_s(retries: int) -> int:
    return RETRY_BACKOFF_S[min(retries, len(RETRY_BACKOFF_S) - 1)]


def install_pool_runtime(app: Celery, settings: CoreSettings, pool: str, bootstrap: PoolBootstrap[T], *,
                         metrics_port: int = 0, instrument: Sequence[Callable[[], object]] = (),
                         execution_of: Callable[[T], JobExecution] | None = None) -> None:
    """Everything a pool's worker process runs beside its tasks: JSON logs with the job and trace ids,
    tracing from the OTEL_* environment (Celery and Redis instrumented, plus `instrument`, e.g.
    `telemetry.instrument_grpc_client`), the Prometheus metrics server on `metrics_port` (0: none),
    the bootstrap of its runtime, the heartbeat for the liveness probe, and, for the pools that run
    jobs (`execution_of` given), the sweeper thread (one active per deployment).

    Call it in the pool's app factory, before the worker starts. The metrics server serves this
    process's default registry, which holds every job counted by its threads: the pools run Celery's
    threads pool (a prefork pool would need prometheus_client's multiprocess mode).
    """
    service = POOL_SERVICE_NAMES.get(pool, f"smallfirst-{pool}-worker")
    telemetry.install_worker_logging(service, level=settings.log_level, json=settings.log_json,
                                     task_lines=settings.log_task_lines)
    telemetry.install_worker_telemetry(service, instrument=[telemetry.instrument_redis, *instrument])

    class PoolHeartbeat(HeartbeatStep):
        pool_name = pool
        redis_url = settings.redis_url
        queues = k.POOL_QUEUES.get(pool, ())
        stall_s = settings.worker_stall_s

    app.steps["consumer"].add(PoolHeartbeat)
    install_undecodable_dead_letters(app, settings)
    sweeper_threads: list[SweeperThread | DispatcherThread] = []
    metrics_servers: list[WSGIServer] = []

    @signals.worker_init.connect(weak=False)
    def start_runtime(**_: object) -> None:
        try:
            bootstrap.start()
        except BootstrapError as exc:
            log.critical("%s", exc)
            # SystemExit, not an Exception: Celery's signal dispatch logs and swallows those, and the
            # worker would go on to consume with no runtime. This leaves before the consumer starts.
            raise SystemExit(str(exc)) from exc

    @signals.worker_init.connect(weak=False)
    def exit_when_unrecoverable(sender: Any = None, **_: object) -> None:
        if sender is not None:
            bound_exit_on_failure(sender, settings.worker_exit_grace_s)

    @signals.worker_init.connect(weak=False)
    def start_metrics(**_: object) -> None:
        try:
            server = start_metrics_server(metrics_port)
        except OSError as exc:
            # Only where pools share a host (a dev stack); in a pod the port is the pod's own. The
            # worker still runs its jobs: losing a scrape target must not stop the work.
            log.error("metrics: cannot serve on port %d (%s); this worker exports no metrics", metrics_port, exc)
            return
        if server is not None:
            metrics_servers.append(server)

    @signals.worker_ready.connect(weak=False)
    def start_sweeper(**_: object) -> None:
        if execution_of is None:
            return
        runtime = execution_of(bootstrap.get())
        sweeper = Sweeper(runtime.store, runtime.publisher, outbox_grace_s=settings.sweep_outbox_grace_s)
        thread = SweeperThread(sweeper, interval_s=settings.sweep_interval_s, owner=runtime.worker_name)
        thread.start()
        sweeper_threads.append(thread)
        # The fair dispatchers of the queues this pool consumes: started whether or not this process
        # publishes fairly (`fair_scheduling`), so that entries already in fair lists always move.
        fair = runtime.publisher.fair or FairQueues(runtime.store.redis)
        for queue in k.POOL_QUEUES.get(pool, ()):
            if queue in k.FAIR_QUEUES:
                dispatcher = Dispatcher(fair, runtime.publisher, queue, depth=settings.fair_queue_depth,
                                        jobs_per_message=settings.small_jobs_per_message)
                feeder = DispatcherThread(dispatcher, owner=runtime.worker_name, poll_s=settings.fair_poll_s,
                                          lock_ttl_s=settings.fair_lock_ttl_s)
                feeder.start()
                sweeper_threads.append(feeder)
        fed = tuple(queue for queue in k.POOL_QUEUES.get(pool, ()) if queue in k.FAIR_QUEUES)
        if fed:
            def nudge_dispatchers(**_: object) -> None:
                # A message left a queue this pool consumes: its dispatcher may refill at once (woken
                # only if entries wait in the fair lists: otherwise it has nothing to refill with).
                try:
                    fair.nudge(fed)
                except (redis.RedisError, OSError) as exc:
                    log.debug("dispatcher wake-up not sent: %s", exc)

            signals.task_prerun.connect(nudge_dispatchers, weak=False)

    @signals.worker_shutdown.connect(weak=False)
    def stop_sweeper(**_: object) -> None:
        for thread in sweeper_threads:
            thread.stop()
        for server in metrics_servers:
            server.shutdown()


def bound_exit_on_failure(worker: Any, grace_s: float) -> None:
    """Make a worker whose consumer failed for good leave within `grace_s`, non-zero.

    Celery answers an unrecoverable error of its consumer (it logs "Unrecoverable error") with a warm
    shutdown: it stops consuming and then waits for every running task, which in the threads pool
    is unbounded, so the process lingers, alive but taking no message. Here, once a stop with a
    failure exit code begins, a timer ends the process with that code after `grace_s` even if
    tasks are still running; their messages are unacknowledged, so the broker or the sweeper gives
    them to another worker. The supervisor (Kubernetes, compose `restart:`, `smallfirst dev`)
    starts a fresh worker.
    """
    original_stop = worker.stop

    def stop(in_sighandler: bool = False, exitcode: int | None = None) -> None:
        if exitcode not in (None, 0):
            code = int(exitcode)
            log.critical("the worker stops with exit code %d; it leaves in at most %.0f s", code, grace_s)
            timer = threading.Timer(grace_s, _hard_exit, args=(code,))
            timer.daemon = True
            timer.start()
        original_stop(in_sighandler=in_sighandler, exitcode=exitcode)

    worker.stop = stop


def _hard_exit(code: int) -> None:
    log.critical("running tasks did not finish within the exit grace; leaving now with exit code %d", code)
    logging.shutdown()
    os._exit(code)


class UndecodableMessages:
    """Keeps every queue message this pool cannot decode in the dead letters (Celery would log it
    and drop it): a body that is not JSON, a message without a task, a task this worker does not
    know, arguments that do not fit the task. The message itself is acknowledged or rejected as
    Celery does, so it never loops."""

    def __init__(self, settings: CoreSettings) -> None:
        self.settings = settings
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def record(self, message: object, error: str) -> None:
        try:
            with self._lock:
                if self._client is None:
                    self._client = pool_redis(self.settings)
                client = self._client
            delivery_info = getattr(message, "delivery_info", None) or {}
            entry = record_undecodable(client, getattr(message, "body", message), error,
                                       queue=delivery_info.get("routing_key"),
                                       retention_s=self.settings.job_retention_s)
            default_job_metrics().dead_letters_added.labels("", REASON_UNDECODABLE).inc()
            log.error("undecodable message kept as dead letter %s: %s", entry.id, error)
        except (redis.RedisError, OSError) as exc:
            log.error("undecodable message could not be kept in the dead letters (%s): %s", exc, error)


def install_undecodable_dead_letters(app: Celery, settings: CoreSettings) -> UndecodableMessages:
    undecodable = UndecodableMessages(settings)

    class DeadLetterDecodeErrors(bootsteps.StartStopStep):
        """Wraps the consumer's decode-error handler (Celery sends no signal for it)."""

        def __init__(self, parent: object, **kwargs: object) -> None:
            super().__init__(parent, **kwargs)
            celery_handler = parent.on_decode_error  # type: ignore[attr-defined]

            def on_decode_error(message: object, exc: BaseException) -> None:
                undecodable.record(message, f"cannot decode the message: {type(exc).__name__}: {exc}")
                celery_handler(message, exc)

            parent.on_decode_error = on_decode_error  # type: ignore[attr-defined]

    app.steps["consumer"].add(DeadLetterDecodeErrors)

    @signals.task_rejected.connect(weak=False)
    def on_rejected(message: object = None, exc: BaseException | None = None, **_: object) -> None:
        undecodable.record(message, f"not a task message: {exc}" if exc is not None
                           else "not a task message (no task header)")

    @signals.task_unknown.connect(weak=False)
    def on_unknown(message: object = None, name: str = "", **_: object) -> None:
        undecodable.record(message, f"unknown task {name!r}")

    return undecodable


class JobRunner(Protocol):
    def run(self, job_id: str, task_id: str) -> None: ...


def register_job_task(app: Celery, name: str, tier: Tier, runner: Callable[[], JobRunner]) -> None:
    """The Celery task that runs one delivery of a job on `tier`. An infrastructure error gives the
    message back with a backoff instead of failing the job, so a Redis restart loses nothing."""

    @app.task(name=name, bind=True)
    def run_job(self: CeleryTask, job_id: str) -> None:
        try:
            with telemetry.job_span(k.SPAN_JOB_ATTEMPT, job_id, tier=tier.value):
                runner().run(job_id, self.request.id)
        except RETRYABLE_ERRORS as exc:
            log.warning("job %s: infrastructure error, retrying: %s", job_id, exc)
            raise self.retry(exc=exc, countdown=retry_countdown_s(self.request.retries), max_retries=None,
                             retry=True, retry_policy=RETRY_PUBLISH_POLICY) from exc


def register_jobs_task(app: Celery, name: str, tier: Tier, runner: Callable[[], JobRunner],
                       fan_out: Callable[[], Executor]) -> None:
    """The Celery task that runs one delivery of each of several jobs (`TASK_RUN_SMALL_MANY`).

    Each job runs on `fan_out` (the process's job threads), so that the jobs of one message run side
    by side (their embeddings share the coalescer's batches) and each in its own job span, under its
    own traceparent. The message ends when every job has: acknowledged once all ran; given back, with
    a backoff, carrying only the jobs that met an infrastructure error (the others ended already);
    rejected without requeue if one raised anything else (a bug: as with a one-job message, its
    job's lease runs out and the sweeper publishes it again, while the jobs that ended stay ended;
    the same holds for such a job when another met an infrastructure error and the retry carries
    only that one)."""

    def run_one(job_id: str, traceparent: str | None, task_id: str) -> None:
        with telemetry.continued_trace(traceparent), \
                telemetry.job_span(k.SPAN_JOB_ATTEMPT, job_id, tier=tier.value):
            runner().run(job_id, task_id)

    @app.task(name=name, bind=True)
    def run_jobs(self: CeleryTask, job_ids: list[str], traceparents: list[str | None]) -> None:
        if len(traceparents) != len(job_ids):
            raise ValueError(f"{len(job_ids)} job ids but {len(traceparents)} traceparents")
        pool = fan_out()
        futures = [pool.submit(run_one, job_id, traceparent, self.request.id)
                   for job_id, traceparent in zip(job_ids, traceparents, strict=True)]
        again: list[int] = []
        retryable: BaseException | None = None
        failure: BaseException | None = None
        for i, future in enumerate(futures):
            try:
                future.result()
            except RETRYABLE_ERRORS as exc:
                again.append(i)
                retryable = exc
            except Exception as exc:
                log.exception("job %s: its delivery failed", job_ids[i])
                failure = failure or exc
        if again:
            log.warning("jobs %s: infrastructure error, retrying: %s", [job_ids[i] for i in again], retryable)
            raise self.retry(args=[[job_ids[i] for i in again], [traceparents[i] for i in again]], exc=retryable,
                             countdown=retry_countdown_s(self.request.retries), max_retries=None,
                             retry=True, retry_policy=RETRY_PUBLISH_POLICY) from retryable
        if failure is not None:
            raise failure

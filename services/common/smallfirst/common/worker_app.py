"""What both worker pools share around their Celery tasks: building the per-process runtime after
the worker starts, retrying on infrastructure errors, the sweeper, the liveness heartbeat, and the
observability of the process (JSON logs, tracing, the Prometheus metrics server)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import redis
from celery import Celery, signals
from celery import Task as CeleryTask

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import load_catalog
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import Tier
from smallfirst.common.metrics import start_metrics_server
from smallfirst.common.queues import Publisher
from smallfirst.common.runtime import HeartbeatStep, Sweeper, SweeperThread
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore, StoreConflict

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors of the infrastructure (not of the job): the task gives its message back to the queue with a
# backoff instead of failing the job, so a Redis restart loses nothing.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, StoreConflict)
RETRY_BACKOFF_S = (1, 2, 5, 10, 30, 60)

# The service name each pool's traces and logs carry (OTEL_SERVICE_NAME overrides it).
POOL_SERVICE_NAMES: dict[str, str] = {
    k.POOL_SMALL: k.SERVICE_SMALL_WORKER,
    k.POOL_FRONTIER: k.SERVICE_FRONTIER_WORKER,
}


class Lazy(Generic[T]):
    """Built on first use, once, in the worker process: gRPC channels and Redis pools must not be
    created before a process forks (grpc/grpc#13464)."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._factory()
        return self._value

    @property
    def built(self) -> bool:
        return self._value is not None


def build_execution(settings: CoreSettings, app: Celery) -> JobExecution:
    client = redis.Redis.from_url(settings.redis_url, health_check_interval=10, socket_keepalive=True)
    store = JobStore(client, retention_s=settings.job_retention_s, stale_after_s=settings.sweep_stale_after_s)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    return JobExecution(store, Publisher(app), load_catalog(settings.catalog_path), lease_s=settings.job_lease_s,
                        worker_name=worker_name)


def retry_countdown_s(retries: int) -> int:
    return RETRY_BACKOFF_S[min(retries, len(RETRY_BACKOFF_S) - 1)]


def install_pool_runtime(app: Celery, settings: CoreSettings, pool: str, execution: Lazy[JobExecution], *,
                         metrics_port: int = 0, instrument: Sequence[Callable[[], object]] = ()) -> None:
    """Everything a pool's worker process runs beside its tasks: JSON logs with the job and trace ids,
    tracing from the OTEL_* environment (Celery and Redis instrumented, plus `instrument`, e.g.
    `telemetry.instrument_grpc_client`), the Prometheus metrics server on `metrics_port` (0: none),
    the heartbeat for the liveness probe, and the sweeper thread (one active per deployment).

    Call it in the pool's app factory, before the worker starts. The metrics server serves this
    process's default registry, which holds every job counted by its threads: the pools run Celery's
    threads pool (a prefork pool would need prometheus_client's multiprocess mode).
    """
    service = POOL_SERVICE_NAMES.get(pool, f"smallfirst-{pool}-worker")
    telemetry.install_worker_logging(service, level=settings.log_level, json=settings.log_json)
    telemetry.install_worker_telemetry(service, instrument=[telemetry.instrument_redis, *instrument])

    class PoolHeartbeat(HeartbeatStep):
        pool_name = pool

    app.steps["consumer"].add(PoolHeartbeat)
    sweeper_threads: list[SweeperThread] = []
    metrics_servers: list[WSGIServer] = []

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
        runtime = execution.get()
        thread = SweeperThread(Sweeper(runtime.store, runtime.publisher), interval_s=settings.sweep_interval_s,
                               owner=runtime.worker_name)
        thread.start()
        sweeper_threads.append(thread)

    @signals.worker_shutdown.connect(weak=False)
    def stop_sweeper(**_: object) -> None:
        for thread in sweeper_threads:
            thread.stop()
        for server in metrics_servers:
            server.shutdown()


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
            raise self.retry(exc=exc, countdown=retry_countdown_s(self.request.retries), max_retries=None) from exc

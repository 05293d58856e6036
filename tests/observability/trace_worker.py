"""A Celery worker for the trace propagation test, built like the real pools: `make_celery` (late
acks, priority queues), the threads pool, and telemetry installed with `install_worker_telemetry`.

Its two tasks carry the real task names and stand in for the small and frontier runtimes: the
small one records a job span, touches Redis and publishes the escalation with the real
Publisher; the frontier one records a job span and marks the job done in Redis.

    python -m tests.observability.trace_worker
"""

from __future__ import annotations

import logging
import time

import redis
from celery import Task as CeleryTask

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.jobs import Job, Priority, RouteDecision, RouteReason, Tier
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.settings import CoreSettings

SERVICE = "obs-worker"
log = logging.getLogger("tests.observability.trace_worker")


def done_key(job_id: str) -> str:
    return f"test:trace:done:{job_id}"


def _job(job_id: str) -> Job:
    now = time.time()
    return Job(id=job_id, tenant="t", task="test", input={"text": "hello"}, priority=Priority.LOW,
               route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT), created_at=now,
               updated_at=now, queued_at=now)


def main() -> None:
    settings = CoreSettings()  # from SMALLFIRST_* variables
    app = make_celery(settings)
    telemetry.install_worker_logging(SERVICE, level="INFO", json=True)
    telemetry.install_worker_telemetry(SERVICE, instrument=[telemetry.instrument_redis])
    publisher = Publisher(app)

    @app.task(name=k.TASK_RUN_SMALL, bind=True)
    def run_small(self: CeleryTask, job_id: str) -> None:
        with telemetry.job_span(k.SPAN_JOB_ATTEMPT, job_id, tier=Tier.SMALL.value):
            redis.Redis.from_url(settings.redis_url).incr(f"test:trace:attempts:{job_id}")
            log.info("small attempt failed validation; escalating")
            publisher.publish_escalation(_job(job_id))

    @app.task(name=k.TASK_RUN_FRONTIER, bind=True)
    def run_frontier(self: CeleryTask, job_id: str) -> None:
        with telemetry.job_span(k.SPAN_JOB_ATTEMPT, job_id, tier=Tier.FRONTIER.value):
            log.info("frontier attempt succeeded")
            redis.Redis.from_url(settings.redis_url).set(done_key(job_id), telemetry.current_trace_id() or "")

    app.worker_main([
        "worker", "--pool", "threads", "--concurrency", "4", "--loglevel", "INFO",
        "--queues", ",".join([k.QUEUE_SMALL, k.QUEUE_ESCALATION]), "--hostname", "obs-trace@%h",
        "--without-gossip", "--without-mingle",
    ])


if __name__ == "__main__":
    main()

"""What every worker pool runs beside its tasks: the sweeper that makes sure no accepted job is lost,
and the heartbeat that the Kubernetes liveness probe reads.

The sweeper covers the gaps Celery's at-least-once delivery leaves on a Redis broker: a message
lost on an abrupt kill (kombu#1836), a crash between a job's state change and the publish that
follows it, and a worker that died holding a job whose message will only be restored after the
visibility timeout. Re-publishing is always safe: the job's compare-and-set lets exactly one
delivery run an attempt.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps

from smallfirst.common import constants as k
from smallfirst.common.jobs import JobStatus, Tier
from smallfirst.common.queues import Publisher
from smallfirst.common.store import CorruptJob, JobNotFound, JobStore

log = logging.getLogger(__name__)


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in `queue`, summed over its priority lists."""
    with client.pipeline(transaction=False) as pipe:
        for key in k.priority_list_keys(queue):
            pipe.llen(key)
        return int(sum(pipe.execute()))


class Sweeper:
    """Re-publishes jobs that made no progress in time, and webhooks that are due."""

    def __init__(self, store: JobStore, publisher: Publisher, *, webhook_retry_s: float = 60.0) -> None:
        self.store = store
        self.publisher = publisher
        self.webhook_retry_s = webhook_retry_s

    def sweep_once(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        counts = {"republished": 0, "dropped": 0, "webhooks": 0}
        for job_id in self.store.due_jobs(now):
            try:
                job = self.store.get(job_id)
            except (JobNotFound, CorruptJob):
                self.store.redis.zrem(k.ACTIVE_JOBS_KEY, job_id)
                counts["dropped"] += 1
                continue
            if job.status.terminal:
                self.store.redis.zrem(k.ACTIVE_JOBS_KEY, job_id)
                continue
            if self._republish(job, now):
                counts["republished"] += 1
            self.store.rearm(job_id, now)
        due_hooks = self.store.redis.zrangebyscore(k.WEBHOOK_OUTBOX_KEY, "-inf", now, start=0, num=100)
        for raw in due_hooks:
            job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
            # Push the entry forward first: the delivery task removes it when it is done.
            self.store.redis.zadd(k.WEBHOOK_OUTBOX_KEY, {job_id: now + self.webhook_retry_s}, xx=True)
            self.publisher.publish_webhook(job_id)
            counts["webhooks"] += 1
        return counts

    def _republish(self, job: Any, now: float) -> bool:
        attempt = job.open_attempt()
        if job.status is JobStatus.RUNNING:
            if attempt is None or attempt.lease_expires_at > now:
                return False
            log.warning("job %s: attempt %s lost its worker; re-publishing", job.id, attempt.number)
            if attempt.tier is Tier.SMALL:
                self.publisher.publish_job(job)
            elif any(a.tier is Tier.SMALL for a in job.attempts):
                self.publisher.publish_escalation(job)
            else:
                self.publisher.publish_job(job)
            return True
        # Queued or escalated: a message may still be waiting behind a backlog. Only an empty queue
        # proves it was lost (a duplicate would be harmless, but would grow a backlog further).
        if job.status is JobStatus.ESCALATED:
            if queue_depth(self.store.redis, k.QUEUE_ESCALATION) == 0:
                log.warning("job %s: escalation message missing; re-publishing", job.id)
                self.publisher.publish_escalation(job)
                return True
            return False
        queue = k.QUEUE_SMALL if job.route.tier is Tier.SMALL else k.QUEUE_FRONTIER
        if queue_depth(self.store.redis, queue) == 0:
            log.warning("job %s: queued message missing; re-publishing", job.id)
            self.publisher.publish_job(job)
            return True
        return False


class SweeperThread(threading.Thread):
    """Runs the sweeper in one worker process of the whole deployment at a time (a Redis lock)."""

    def __init__(self, sweeper: Sweeper, *, interval_s: float, owner: str) -> None:
        super().__init__(name="smallfirst-sweeper", daemon=True)
        self.sweeper = sweeper
        self.interval_s = interval_s
        self.owner = owner
        self.stopping = threading.Event()

    def run(self) -> None:
        client = self.sweeper.store.redis
        lock_ttl_ms = int(self.interval_s * 3 * 1000)
        while not self.stopping.wait(self.interval_s):
            try:
                holder = client.get(k.SWEEPER_LOCK_KEY)
                mine = holder is not None and holder.decode() == self.owner
                if mine:
                    client.pexpire(k.SWEEPER_LOCK_KEY, lock_ttl_ms)
                elif not client.set(k.SWEEPER_LOCK_KEY, self.owner, nx=True, px=lock_ttl_ms):
                    continue
                counts = self.sweeper.sweep_once()
                if any(counts.values()):
                    log.info("sweeper: %s", counts)
            except redis.RedisError as exc:
                # Redis away: the next round tries again; nothing to sweep without it anyway.
                log.warning("sweeper: redis unavailable: %s", exc)

    def stop(self) -> None:
        self.stopping.set()


# ---- Liveness heartbeat -------------------------------------------------------------------------
def heartbeat_path(pool: str) -> Path:
    return Path(os.environ.get("SMALLFIRST_HEARTBEAT_DIR", "/tmp")) / f"smallfirst-worker-{pool}.heartbeat"


def heartbeat_age_s(pool: str, now: float | None = None) -> float | None:
    try:
        mtime = heartbeat_path(pool).stat().st_mtime
    except FileNotFoundError:
        return None
    return (time.time() if now is None else now) - mtime


class HeartbeatStep(bootsteps.StartStopStep):
    """Touches the heartbeat file from the consumer's own event loop: if that loop hangs (the failure
    mode of celery#8082, a consumer that stops consuming), the file goes stale and the probe fails."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    interval_s = 10.0
    pool_name = "worker"

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None

    def start(self, parent: Any) -> None:
        path = heartbeat_path(self.pool_name)
        path.parent.mkdir(parents=True, exist_ok=True)

        def beat() -> None:
            path.touch()

        beat()
        self._timer_entry = parent.timer.call_repeatedly(self.interval_s, beat)

    def stop(self, parent: Any) -> None:
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        heartbeat_path(self.pool_name).unlink(missing_ok=True)

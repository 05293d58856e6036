"""What every worker pool runs beside its tasks: the sweeper that makes sure no accepted job is lost,
and the heartbeat that the Kubernetes liveness probe reads.

The sweeper covers the gaps Celery's at-least-once delivery leaves on a Redis broker: a message
lost on an abrupt kill (kombu#1836) or with the last writes of a killed Redis, a crash between a
job's state change and the publish that follows it (for new jobs: the publish outbox the API
writes in the job's own transaction), and a worker that died holding a job whose message will only
be restored after the visibility timeout. Re-publishing is always safe: the job's compare-and-set lets exactly one
delivery run an attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import bootsteps, signals
from celery.worker import state as worker_state

from smallfirst.common import constants as k
from smallfirst.common.fair import FairQueues
from smallfirst.common.jobs import Job, JobStatus, Tier
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
    """Re-publishes jobs whose message may be missing, and webhooks that are due.

    Three nets, each cheap and each harmless when it catches a job that was fine (a duplicate
    message is dropped by the job's compare-and-set):
    - the publish outbox: a new job whose first message was not confirmed within `outbox_grace_s`
      of its storing (the API crashed or lost Redis between its transaction and its publish);
    - the active-jobs index: any unfinished job past its progress deadline is re-published,
      whatever the length of its queue (a backlog cannot hide a lost message: a job waiting behind
      one gets at most one extra message per `stale_after_s`);
    - a Redis restart (its run id changed): the restarted server may have lost the last writes of
      the old one, messages included, so every unfinished job not held by a live lease is
      re-published at once rather than after its deadline;
    - the fair dispatchers' records (`FAIR_DISPATCHING_KEY`): a job taken from a fair list whose
      message was not confirmed sent within `outbox_grace_s` (its dispatcher died) is published
      straight to its Celery queue: it had its turn.

    With fair scheduling a re-published queued job goes back through its tenant's fair list (at its
    end): a job waiting there past its progress deadline gets one duplicate entry per
    `stale_after_s` (the deadline is re-armed), never a flood, and the duplicate is a no-op delivery.
    """

    def __init__(self, store: JobStore, publisher: Publisher, *, webhook_retry_s: float = 60.0,
                 outbox_grace_s: float = 10.0) -> None:
        self.store = store
        self.publisher = publisher
        self.webhook_retry_s = webhook_retry_s
        self.outbox_grace_s = outbox_grace_s

    def sweep_once(self, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        counts = {"republished": 0, "dropped": 0, "webhooks": 0, "unpublished": 0, "after_restart": 0,
                  "undispatched": 0}
        if self._redis_restarted():
            log.warning("sweeper: Redis restarted; re-publishing every unfinished job")
            counts["after_restart"] = self._republish_all(now)
        for job_id in self.store.unpublished(now - self.outbox_grace_s):
            if self._drain_outbox_entry(job_id, now):
                counts["unpublished"] += 1
        fair = FairQueues(self.store.redis) if self.publisher.fair is None else self.publisher.fair
        for job_id in fair.stranded(now - self.outbox_grace_s):
            if self._finish_dispatch(job_id):
                counts["undispatched"] += 1
            fair.sent([job_id])
        for job_id in self.store.due_jobs(now):
            job = self._active(job_id)
            if job is None:
                counts["dropped"] += 1
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

    def _active(self, job_id: str) -> Job | None:
        """The job if it has not ended; a missing, unreadable or ended job leaves the index."""
        try:
            job = self.store.get(job_id)
        except (JobNotFound, CorruptJob):
            self.store.redis.zrem(k.ACTIVE_JOBS_KEY, job_id)
            return None
        if job.status.terminal:
            self.store.redis.zrem(k.ACTIVE_JOBS_KEY, job_id)
            return None
        return job

    def _redis_restarted(self) -> bool:
        """True once per Redis restart: the server's run id differs from the one the last sweep saw
        (kept in Redis itself, so it survives the restart on the AOF and a new sweeper process)."""
        run_id = str(self.store.redis.info("server").get("run_id", ""))
        previous = self.store.redis.set(k.REDIS_RUN_ID_KEY, run_id, ex=k.REDIS_RUN_ID_TTL_S, get=True)
        if previous is None:
            return False
        return (previous.decode() if isinstance(previous, bytes) else str(previous)) != run_id

    def _republish_all(self, now: float) -> int:
        count = 0
        for job_id in list(self.store.active_jobs()):
            job = self._active(job_id)
            if job is not None and self._republish(job, now):
                count += 1
        return count

    def _drain_outbox_entry(self, job_id: str, now: float) -> bool:
        try:
            job = self.store.get(job_id)
        except (JobNotFound, CorruptJob):
            self.store.published([job_id])
            return False
        # Still waiting in the state its unconfirmed message was for: publish that message (a
        # retry's not before its time). A job that moved on was delivered: nothing to do.
        countdown_s = (job.retry_at - now) if job.retry_at and job.retry_at > now else None
        republish = job.status in (JobStatus.QUEUED, JobStatus.ESCALATED) and job.open_attempt() is None
        if republish:
            log.warning("job %s: %s but its message not confirmed; publishing it", job.id, job.status.value)
            if job.status is JobStatus.ESCALATED:
                self.publisher.publish_escalation(job, countdown_s=countdown_s)
            else:
                self.publisher.publish_job(job, countdown_s=countdown_s)
        # Removed only after the publish: a failure here leaves the entry for the next sweep.
        self.store.published([job_id])
        return republish

    def _finish_dispatch(self, job_id: str) -> bool:
        """A job a dispatcher took from a fair list and may not have sent: send it, if still queued."""
        try:
            job = self.store.get(job_id)
        except (JobNotFound, CorruptJob):
            return False
        if job.status is not JobStatus.QUEUED or job.open_attempt() is not None:
            return False
        log.warning("job %s: taken from its fair list but its message not confirmed; publishing it", job.id)
        self.publisher.publish_job(job, direct=True)
        return True

    def _republish(self, job: Job, now: float) -> bool:
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
        # Queued or escalated and past its deadline (or Redis restarted): its message may be lost.
        # Whether it still waits behind a backlog cannot be told cheaply, so publish regardless: a
        # duplicate is one no-op delivery, a lost message a job that never ends.
        countdown_s = (job.retry_at - now) if job.retry_at and job.retry_at > now else None
        if job.status is JobStatus.ESCALATED:
            log.warning("job %s: escalated and past due; re-publishing its frontier message", job.id)
            self.publisher.publish_escalation(job, countdown_s=countdown_s)
        else:
            log.warning("job %s: queued and past due; re-publishing its message", job.id)
            self.publisher.publish_job(job, countdown_s=countdown_s)
        return True


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


class Dispatcher:
    """Feeds one Celery tier queue from its fair lists (fair.py): keeps about `depth` messages
    waiting at the fair priority steps, refilled by weighted deficit round robin over tenants.

    `dispatch_once` is one refill: one script call that reads the room left (depth minus the
    messages waiting at the high, normal and low steps; shadow samples, behind them all, do not
    count), pops that many entries and records them as dispatching; then the messages sent through
    the publisher (one producer, pipelined), the records removed. The script also says whether
    entries still wait (`waiting`), so the thread knows how soon to look again without asking.

    With `jobs_per_message` above 1 (the small queue), the room is counted in jobs: `depth`
    messages of up to that many jobs each; a quiet queue still gets one job a message.
    """

    def __init__(self, fair: FairQueues, publisher: Publisher, queue: str, *, depth: int,
                 jobs_per_message: int = 1) -> None:
        self.fair = fair
        self.publisher = publisher
        self.queue = queue
        self.depth = depth
        self.jobs_per_message = jobs_per_message if queue == k.QUEUE_SMALL else 1
        keys = k.priority_list_keys(queue)
        self._counted = tuple(keys[k.PRIORITY_STEPS.index(step)] for step in k.FAIR_STEPS)
        # Whether entries were left in the fair lists by the last refill (true until one ran).
        self.waiting = True

    def dispatch_once(self, now: float | None = None) -> int:
        entries, self.waiting = self.fair.take(self.queue, self.depth * self.jobs_per_message, now,
                                               counted=self._counted, per_message=self.jobs_per_message)
        if not entries:
            return 0
        self.publisher.dispatch(self.queue, entries, jobs_per_message=self.jobs_per_message)
        # Removed only once sent: a failure before leaves the records for the sweeper.
        self.fair.sent([entry.job_id for entry in entries])
        return len(entries)


class DispatcherThread(threading.Thread):
    """Runs a queue's dispatcher in one worker process of the whole deployment at a time (a Redis
    lock with a TTL, renewed every round; a successor continues from the state in Redis).

    It blocks on the queue's wake-up list (an enqueue pushes to it, and so does a worker of the pool
    as it starts a task while entries wait in the fair lists, `worker_app`), so an unloaded job waits
    a round trip, not a poll interval, and a full queue is refilled as soon as a worker takes a
    message; while a backlog waits behind a full tier queue it also looks again every `poll_s`. A
    refill that leaves nothing waiting goes straight back to the wake-up list (an enqueue after it
    left its wake-up there), and a task start with nothing waiting does not wake the thread: an
    unloaded job costs the dispatcher one refill, not three, beside the job's own threads. A process
    that is not elected looks at the lock every third of its TTL.
    """

    def __init__(self, dispatcher: Dispatcher, *, owner: str, poll_s: float, lock_ttl_s: float,
                 idle_s: float = 1.0) -> None:
        super().__init__(name=f"smallfirst-dispatcher-{dispatcher.queue}", daemon=True)
        self.dispatcher = dispatcher
        self.owner = owner
        self.poll_s = poll_s
        self.lock_ttl_s = lock_ttl_s
        self.idle_s = min(idle_s, lock_ttl_s / 3)
        self.stopping = threading.Event()

    def run(self) -> None:
        fair = self.dispatcher.fair
        queue = self.dispatcher.queue
        renewed_at = float("-inf")
        while not self.stopping.is_set():
            try:
                if time.monotonic() - renewed_at >= self.lock_ttl_s / 3:
                    if not fair.elect(queue, self.owner, self.lock_ttl_s):
                        renewed_at = float("-inf")
                        self.stopping.wait(self.lock_ttl_s / 3)
                        continue
                    renewed_at = time.monotonic()
                moved = self.dispatcher.dispatch_once()
                if moved and self.dispatcher.waiting:
                    continue
                # The queue is full (look again soon while a backlog waits) or nothing is left to move
                # (sleep until an enqueue wakes us: one that came after the refill left its wake-up).
                fair.wait_for_work(queue, self.poll_s if self.dispatcher.waiting else self.idle_s)
            except (redis.RedisError, OSError) as exc:
                log.warning("dispatcher %s: redis unavailable: %s", queue, exc)
                self.stopping.wait(1.0)
            except Exception:
                # A broker error while sending (the records stay for the sweeper): try again shortly.
                log.exception("dispatcher %s: refill failed", queue)
                self.stopping.wait(1.0)
        with contextlib.suppress(redis.RedisError, OSError):
            fair.resign(queue, self.owner)

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


class ConsumptionMonitor:
    """Whether a worker is consuming: it received a message lately, or all its threads are busy, or
    nothing waits in its queues. Only "messages wait, threads are free, nothing arrives" is a stall:
    the failure of a consumer that reconnected but no longer polls the queues (celery#8082, #10205),
    whose event loop, and so a plain timer heartbeat, keeps running.

    A broker that cannot be reached is not a stall of this worker (restarting it would not help, and
    every worker of the pool would be restarted at once): it keeps beating, and the consumer's own
    reconnection, or its exit on an unrecoverable error, handles the outage.
    """

    def __init__(self, client: redis.Redis | None, queues: tuple[str, ...], *, stall_s: float,
                 concurrency: int | None) -> None:
        self.client = client
        self.queues = queues
        self.stall_s = stall_s
        self.concurrency = concurrency
        self.last_received = time.monotonic()

    def received(self) -> None:
        self.last_received = time.monotonic()

    def waiting(self) -> int:
        assert self.client is not None
        return sum(queue_depth(self.client, queue) for queue in self.queues)

    def consuming(self, active: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now - self.last_received < self.stall_s:
            return True
        if self.concurrency is not None and active >= self.concurrency:
            return True
        if self.client is None:
            return True
        try:
            waiting = self.waiting()
        except (redis.RedisError, OSError):
            return True
        if waiting:
            log.error("worker stalled: %d messages wait in %s, %d of %s threads busy, nothing received for %.0f s",
                      waiting, ",".join(self.queues), active, self.concurrency, now - self.last_received)
            return False
        return True


class HeartbeatStep(bootsteps.StartStopStep):
    """Touches the heartbeat file from the consumer's own event loop while the worker consumes: if that
    loop hangs, or the consumer stops taking messages that wait for it (`ConsumptionMonitor`), the
    file goes stale and the liveness probe fails."""

    requires = {"celery.worker.consumer.tasks:Tasks"}
    interval_s = 10.0
    pool_name = "worker"
    # Set by the pool (worker_app.install_pool_runtime): how to read its queues, and when to call it a stall.
    redis_url: str | None = None
    queues: tuple[str, ...] = ()
    stall_s = 60.0

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._timer_entry: Any = None
        self.monitor: ConsumptionMonitor | None = None

    def start(self, parent: Any) -> None:
        path = heartbeat_path(self.pool_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        client = (redis.Redis.from_url(self.redis_url, socket_timeout=2, socket_connect_timeout=2)
                  if self.redis_url else None)
        concurrency = getattr(getattr(parent, "controller", None), "concurrency", None)
        monitor = ConsumptionMonitor(client, self.queues, stall_s=self.stall_s,
                                     concurrency=concurrency if isinstance(concurrency, int) else None)
        self.monitor = monitor
        # The consumer starts over after a reconnect: a new grace period for it to take a message.
        signals.task_received.connect(self._on_received, weak=False)

        def beat() -> None:
            if monitor.consuming(active=len(worker_state.active_requests)):
                path.touch()

        path.touch()
        # Often enough that a stall shows within about `stall_s` (and never less often than every 10 s).
        self._timer_entry = parent.timer.call_repeatedly(min(self.interval_s, self.stall_s / 2), beat)

    def _on_received(self, **_: Any) -> None:
        if self.monitor is not None:
            self.monitor.received()

    def stop(self, parent: Any) -> None:
        # Also on every consumer restart (a lost broker connection): the file stays, and ages while the
        # consumer reconnects, so a reconnect slower than the probe's limit fails the probe.
        if self._timer_entry is not None:
            self._timer_entry.cancel()
        signals.task_received.disconnect(self._on_received)

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        heartbeat_path(self.pool_name).unlink(missing_ok=True)

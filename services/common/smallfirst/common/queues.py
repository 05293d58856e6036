"""The Celery application and the one place that publishes job messages.

Messages carry only the job id; the job record in Redis is the truth. The reliability settings are
those a Redis broker needs for at-least-once delivery: late acks (a message is acknowledged after
its task ran), reject on worker lost (a killed worker's message goes back), prefetch 1 (a busy
worker holds no messages another could run), a visibility timeout longer than the longest job (or
a running job is delivered twice), and soft shutdown (running tasks get time to finish).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from celery import Celery
from kombu import Queue

from smallfirst.common import constants as k
from smallfirst.common.broker import TRANSPORT_PATH, split_broker_url
from smallfirst.common.fair import Dispatched, FairQueues
from smallfirst.common.jobs import Job, JobStatus, Priority, Tier
from smallfirst.common.settings import CoreSettings
from smallfirst.common.telemetry import continued_trace


def make_celery(settings: CoreSettings, *, main: str = "smallfirst") -> Celery:
    broker_url, broker_ssl = split_broker_url(settings.redis_url)
    app = Celery(main, broker=broker_url, set_as_current=False)
    app.conf.update(
        # kombu's Redis transport with the fix for a consumer that loses its connection (broker.py).
        broker_transport=TRANSPORT_PATH,
        # rediss://: the server's certificate is verified unless the URL says otherwise (broker.py).
        broker_use_ssl=broker_ssl,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that passes its time limit gives its message back (requeued) instead of acking it.
        # A task that raises an unexpected exception (a bug or a broken dependency) has its message
        # rejected without requeue either way, so that a poison message cannot loop: its job's
        # lease then runs out and the sweeper re-publishes it (the CAS guards against doubles).
        # Infrastructure errors never get here: the task retries them itself (worker_app).
        task_acks_on_failure_or_timeout=False,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=max(1, settings.task_time_limit_s - 30),
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_timeout_s,
        worker_enable_soft_shutdown_on_idle=True,
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Workers that stop consuming after a Redis reconnect (celery#8082): let the broker
        # connection be re-established instead of cancelling the running tasks.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "queue_order_strategy": "priority",
            "priority_steps": list(k.PRIORITY_STEPS),
            "sep": k.PRIORITY_SEP,
            "health_check_interval": 10,
            "socket_keepalive": True,
        },
        task_queues=[Queue(name) for name in k.ALL_QUEUES],
        task_default_queue=k.QUEUE_SMALL,
        task_default_priority=k.PRIORITY_NORMAL,
        task_routes={
            k.TASK_RUN_SMALL: {"queue": k.QUEUE_SMALL},
            k.TASK_RUN_SMALL_MANY: {"queue": k.QUEUE_SMALL},
            k.TASK_RUN_FRONTIER: {"queue": k.QUEUE_FRONTIER},
            k.TASK_RUN_SHADOW: {"queue": k.QUEUE_FRONTIER},
            k.TASK_DELIVER_WEBHOOK: {"queue": k.QUEUE_WEBHOOKS},
        },
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


def message_priority(priority: Priority, *, escalated: bool = False) -> int:
    step = k.PRIORITY_BY_NAME[priority.value]
    if escalated:
        step = max(k.PRIORITY_STEPS[0], step - k.PRIORITY_ESCALATION_BOOST)
    return step


class Publisher:
    """Sends the message that makes a worker pick a job up. Duplicates are harmless: the job's
    compare-and-set lets exactly one delivery run an attempt.

    Each message carries the `traceparent` of the span that submitted its job (`Job.traceparent`) in
    its headers, where a traced worker continues it: the API publishes without any Celery
    instrumentation, and so without a span per message. Where Celery is instrumented (the workers)
    its producer span replaces it: inside a job's span, a child of that span; elsewhere (the sweeper)
    a span continuing the job's own trace.
    """

    def __init__(self, app: Celery, fair: FairQueues | None = None) -> None:
        self.app = app
        # Fair scheduling (fair.py): a queued job's delivery waits in its tenant's fair list, from
        # which the queue's dispatcher sends it. None: straight to the Celery queue.
        self.fair = fair

    def _fair_first(self, job: Job, countdown_s: float | None) -> bool:
        """Whether this delivery goes through the fair lists: a queued job's, without a delay. A
        retry after a backoff stays an ETA message (the worker holds it until due; fair lists have
        no time order); escalations keep their own step ahead of fresh frontier work and are
        bounded by the small tier's fair share already; a job already running (a lost worker's)
        was dispatched once; shadow samples and webhooks are not tenants' first deliveries."""
        return self.fair is not None and not countdown_s and job.status is JobStatus.QUEUED

    def publish_job(self, job: Job, producer: Any = None, *, countdown_s: float | None = None,
                    direct: bool = False) -> None:
        """Delivery of a queued job, to the tier the routing policy chose (`countdown_s`: not before
        then, for a retry after a backoff). Through its tenant's fair list unless `direct` (a job
        that had its turn: a dispatched job whose dispatcher died) or `_fair_first` says no."""
        if not direct and self._fair_first(job, countdown_s):
            assert self.fair is not None
            self.fair.enqueue([job])
            return
        if job.route.tier is Tier.SMALL:
            self._send(k.TASK_RUN_SMALL, job.id, k.QUEUE_SMALL, message_priority(job.priority), job.traceparent,
                       producer, countdown_s=countdown_s)
        else:
            self._send(k.TASK_RUN_FRONTIER, job.id, k.QUEUE_FRONTIER, message_priority(job.priority),
                       job.traceparent, producer, countdown_s=countdown_s)

    def publish_jobs(self, jobs: Sequence[Job], max_batch: int = 500) -> None:
        """First delivery of many jobs through one producer, pipelined by kombu's `Producer.batch`
        (a few Redis round trips instead of one client and one round trip per message). Celery's
        publish signals still fire for each message. Queued jobs go to the fair lists, when on, in
        one script call per queue."""
        if self.fair is not None:
            fair = [job for job in jobs if self._fair_first(job, None)]
            if fair:
                self.fair.enqueue(fair)
                jobs = [job for job in jobs if not self._fair_first(job, None)]
            if not jobs:
                return
        with self.app.producer_or_acquire() as producer:
            # kombu < 5.7 has no Producer.batch: publish one by one through the shared producer.
            batch = getattr(producer, "batch", None)
            with batch(max_size=max_batch) if batch is not None else contextlib.nullcontext():
                for job in jobs:
                    if job.status is JobStatus.ESCALATED:
                        # A replayed job that had escalated waits for the frontier again.
                        self.publish_escalation(job)
                    else:
                        self.publish_job(job, producer)

    def publish_escalation(self, job: Job, *, countdown_s: float | None = None) -> None:
        self._send(k.TASK_RUN_FRONTIER, job.id, k.QUEUE_ESCALATION, message_priority(job.priority, escalated=True),
                   job.traceparent, countdown_s=countdown_s)

    def publish_shadow(self, job: Job) -> None:
        """A shadow sample of a job the small tier kept, for the frontier pool, behind all else."""
        self._send(k.TASK_RUN_SHADOW, job.id, k.QUEUE_FRONTIER, k.PRIORITY_SHADOW, job.traceparent)

    def dispatch(self, queue: str, entries: Sequence[Dispatched], max_batch: int = 500, *,
                 jobs_per_message: int = 1) -> int:
        """Send the Celery messages of entries a dispatcher took from `queue`'s fair lists, through
        one producer (pipelined), each at its priority step and with its job's traceparent. On the
        small queue, neighbouring entries of one step share a message, up to `jobs_per_message`
        (`TASK_RUN_SMALL_MANY`, each job's traceparent in its arguments); a lone entry keeps the
        one-job message. Answers the number of messages sent."""
        per_message = jobs_per_message if queue == k.QUEUE_SMALL else 1
        groups: list[list[Dispatched]] = []
        for entry in entries:
            if groups and len(groups[-1]) < per_message and groups[-1][0].step == entry.step:
                groups[-1].append(entry)
            else:
                groups.append([entry])
        task = k.TASK_RUN_SMALL if queue == k.QUEUE_SMALL else k.TASK_RUN_FRONTIER
        with self.app.producer_or_acquire() as producer:
            batch = getattr(producer, "batch", None)
            with batch(max_size=max_batch) if batch is not None else contextlib.nullcontext():
                for group in groups:
                    first = group[0]
                    if len(group) == 1:
                        self._send(task, first.job_id, queue, first.step, first.traceparent, producer)
                        continue
                    with continued_trace(first.traceparent):
                        self.app.send_task(
                            k.TASK_RUN_SMALL_MANY, args=[[e.job_id for e in group], [e.traceparent for e in group]],
                            queue=queue, priority=first.step, producer=producer,
                            headers={k.HEADER_TRACEPARENT: first.traceparent} if first.traceparent else None)
        return len(groups)

    def publish_webhook(self, job_id: str, traceparent: str | None = None) -> None:
        self._send(k.TASK_DELIVER_WEBHOOK, job_id, k.QUEUE_WEBHOOKS, k.PRIORITY_NORMAL, traceparent)

    def _send(self, task_name: str, job_id: str, queue: str, priority: int, traceparent: str | None,
              producer: Any = None, *, countdown_s: float | None = None) -> None:
        # Made current for the Celery instrumentation, if any, unless a span already is (a job's).
        # A countdown makes an ETA message that a worker holds, unacked, until it is due; were that
        # worker to die, the sweeper re-publishes the job once its retry time has passed.
        with continued_trace(traceparent):
            self.app.send_task(task_name, args=[job_id], queue=queue, priority=priority, producer=producer,
                               headers={k.HEADER_TRACEPARENT: traceparent} if traceparent else None,
                               countdown=countdown_s if countdown_s else None)

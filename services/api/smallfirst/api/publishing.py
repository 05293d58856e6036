"""Publishing job messages off the event loop, coalesced.

Celery's publishing is blocking, so it runs on one dedicated thread. Submissions that arrive
together are published together through one producer and a pipelined batch (see
`Publisher.publish_jobs`), which is what lets the API accept jobs faster than a loop of
`apply_async` calls. Each request awaits its own messages, so a 202 means "stored and queued".

If publishing fails the job is still stored together with its publish-outbox entry (one
transaction, see `smallfirst.common.store`): the sweeper publishes it within seconds, so an
accepted job is never lost, only delayed; the caller logs and answers 202 all the same. Once a
group is published, `on_published` removes the group's outbox entries in one command.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis
from celery.exceptions import CeleryError
from kombu.exceptions import KombuError

from smallfirst.common.jobs import Job
from smallfirst.common.queues import Publisher

log = logging.getLogger(__name__)


@dataclass
class _Request:
    jobs: Sequence[Job]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


_STOP = object()
PUBLISH_ERRORS = (KombuError, CeleryError, redis.RedisError, OSError)


class PublishError(RuntimeError):
    """The broker refused or could not be reached; the jobs stay stored for the sweeper."""


class PublishPump:
    def __init__(self, publisher: Publisher, max_batch: int,
                 on_published: Callable[[list[str]], None] | None = None) -> None:
        self.publisher = publisher
        self.max_batch = max_batch
        self.on_published = on_published
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="job-publisher", daemon=True)
        self._thread.start()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Publish what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout_s)
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def publish(self, jobs: Sequence[Job]) -> None:
        if not jobs:
            return
        if not self.alive:
            raise PublishError("the publisher is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put(_Request(jobs, future, loop))
        await future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                stopping = True
                pending: list[_Request] = []
            else:
                assert isinstance(first, _Request)
                pending = [first]
            count = sum(len(r.jobs) for r in pending)
            # Take whatever else arrived meanwhile, up to a batch's worth of messages.
            while count < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    continue
                assert isinstance(item, _Request)
                pending.append(item)
                count += len(item.jobs)
            if pending:
                self._publish(pending)

    def _publish(self, pending: list[_Request]) -> None:
        published = False
        # An error outside PUBLISH_ERRORS is a bug: it ends this thread (readiness then fails),
        # but the waiting requests are still answered.
        reason = "the publisher thread failed"
        try:
            jobs = [job for request in pending for job in request.jobs]
            self.publisher.publish_jobs(jobs, max_batch=self.max_batch)
            published = True
            if self.on_published is not None:
                self._confirm([job.id for job in jobs])
        except PUBLISH_ERRORS as exc:
            log.warning("publishing %d job message(s) failed: %s", sum(len(r.jobs) for r in pending), exc)
            reason = str(exc)
        finally:
            for request in pending:
                request.loop.call_soon_threadsafe(_settle, request.future, None if published else reason)


    def _confirm(self, job_ids: list[str]) -> None:
        assert self.on_published is not None
        try:
            self.on_published(job_ids)
        except PUBLISH_ERRORS as exc:
            # Published all the same: the sweeper finds the entries and sends a harmless duplicate.
            log.warning("%d job(s) published but their outbox entries not removed: %s", len(job_ids), exc)


def _settle(future: asyncio.Future[None], error: str | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(PublishError(error))

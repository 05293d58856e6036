"""Wake-ups for long-polls: one pattern subscription per process, waiters in memory.

The store publishes on `job_events_channel(id)` in the same transaction that ends a job. This hub
holds one PSUBSCRIBE connection for the whole process and sets the in-process events of the
waiters of that job, so a thousand long-polls cost one Redis connection and no polling.

A waiter is registered before its handler reads the job, so an end that happens between the read
and the wait still wakes it. Messages published while the subscription is down are lost: after a
reconnect every waiter is woken to read its job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import redis
import redis.asyncio as aioredis

from smallfirst.common import constants as k

log = logging.getLogger(__name__)

_CHANNEL_PREFIX = k.job_events_channel("")
_RECONNECT_MAX_S = 2.0
# How long one read waits on the socket; bounds how quickly stop() is noticed, costs no traffic.
_READ_TIMEOUT_S = 1.0


class JobEventHub:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._stopping = False

    @property
    def subscribed(self) -> bool:
        return self._subscribed.is_set()

    async def start(self, ready_timeout_s: float = 5.0) -> None:
        self._task = asyncio.create_task(self._run(), name="job-event-hub")
        # Not fatal if Redis is down at start: /readyz reports it and the loop keeps trying.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), ready_timeout_s)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._wake_all()

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when `job_id` ends (or when the hub may have missed that it did)."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters.values())

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def _run(self) -> None:
        backoff_s = 0.1
        while not self._stopping:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(k.JOB_EVENTS_PATTERN)
                self._subscribed.set()
                backoff_s = 0.1
                # Ends that happened while we were not subscribed went unheard.
                self._wake_all()
                while not self._stopping:
                    message = await pubsub.get_message(timeout=_READ_TIMEOUT_S)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    channel = message["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else str(channel)
                    self._wake(channel.removeprefix(_CHANNEL_PREFIX))
            except (redis.RedisError, OSError) as exc:
                if self._subscribed.is_set():
                    log.warning("job event subscription lost (%s); reconnecting", exc)
                self._subscribed.clear()
                await asyncio.sleep(backoff_s)
                backoff_s = min(_RECONNECT_MAX_S, backoff_s * 2)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose()

"""Cancel reaches a frontier call in flight: the call's connection is cut and the attempt ends.

Two parts, both per worker process:

- `AbortableTransport`: the HTTP transport of the Anthropic client, one per worker thread (each
  thread runs one call at a time, and keeps its own keep-alive connections). It records the sockets
  its connection pool opens; `abort()` shuts them down (`shutdown(SHUT_RDWR)`, which, unlike
  `close()`, wakes a thread blocked reading the socket and sends the server a FIN). The SDK call
  then raises a connection error at once.
- `CancelWatcher`: one thread that, every `poll_interval_s`, reads the status of the jobs whose
  frontier call is in flight here (one pipelined round trip for all of them) and aborts the call of
  each job that was cancelled. The executor checks the job's cancel flag before each call and
  before each retry, so an aborted call is never retried.

Billing: an aborted call returns no answer and no usage, so the attempt is not billed (it ends
`cancelled`, unbilled, as the cancel left it). Where the provider started generating before the
connection was cut it may charge for that; nothing of it is reported to the client, so the spend
is not known here. Cutting early keeps that part as small as it can be.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import httpcore2
import httpx2
import redis

from smallfirst.common import constants as k
from smallfirst.common.jobs import JobStatus

log = logging.getLogger(__name__)


class _TrackingBackend(httpcore2.SyncBackend):
    """httpcore's own network backend, remembering every stream it opened (weakly)."""

    def __init__(self) -> None:
        super().__init__()
        self.streams: weakref.WeakSet[httpcore2.NetworkStream] = weakref.WeakSet()
        self._guard = threading.Lock()

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        stream = super().connect_tcp(*args, **kwargs)
        with self._guard:
            self.streams.add(stream)
        return stream

    def abort(self) -> int:
        with self._guard:
            streams = list(self.streams)
        cut = 0
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                    cut += 1
        return cut


class AbortableTransport(httpx2.HTTPTransport):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backend = _TrackingBackend()
        # httpx's transport takes no network backend of its own: its pool gets the tracking one before
        # it opened any connection (tests/frontier/test_cancel_abort.py fails if this stops working).
        self._pool._network_backend = self.backend

    def abort(self) -> int:
        """Cut every connection of this transport; the number cut."""
        return self.backend.abort()


class ThreadClients:
    """One Anthropic client per worker thread, each on its own `AbortableTransport` (the settings,
    base URL and key of `base`)."""

    def __init__(self, base: anthropic.Anthropic) -> None:
        self.base = base
        self._local = threading.local()

    def current(self) -> tuple[anthropic.Anthropic, AbortableTransport]:
        found: tuple[anthropic.Anthropic, AbortableTransport] | None = getattr(self._local, "client", None)
        if found is None:
            transport = AbortableTransport()
            http_client = httpx2.Client(transport=transport, timeout=self.base.timeout)
            found = (self.base.with_options(http_client=http_client), transport)
            self._local.client = found
        return found


class CancelWatcher:
    """Aborts the frontier calls of jobs cancelled while they are in flight in this process."""

    def __init__(self, client: redis.Redis, *, poll_interval_s: float = 0.5) -> None:
        self.client = client
        self.poll_interval_s = poll_interval_s
        self._watched: dict[int, tuple[str, threading.Event, AbortableTransport | None]] = {}
        self._guard = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, job_id: str, transport: AbortableTransport | None = None) -> Iterator[threading.Event]:
        """While the block runs, a cancel of `job_id` sets the yielded event and aborts `transport`."""
        cancelled = threading.Event()
        key = id(cancelled)
        with self._guard:
            self._watched[key] = (job_id, cancelled, transport)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="cancel-watcher", daemon=True)
                self._thread.start()
        try:
            yield cancelled
        finally:
            with self._guard:
                self._watched.pop(key, None)

    def check_once(self) -> int:
        """One round: the number of calls aborted."""
        with self._guard:
            watched = list(self._watched.values())
        if not watched:
            return 0
        with self.client.pipeline(transaction=False) as pipe:
            for job_id, _, _ in watched:
                pipe.get(k.job_key(job_id))
            records = pipe.execute()
        aborted = 0
        for (job_id, cancelled, transport), raw in zip(watched, records, strict=True):
            if raw is None or cancelled.is_set() or not _is_cancelled(raw):
                continue
            cancelled.set()
            cut = transport.abort() if transport is not None else 0
            log.info("job %s: cancelled while its frontier call was in flight; %d connection(s) cut", job_id, cut)
            aborted += 1
        return aborted

    def _loop(self) -> None:
        stop = threading.Event()
        while True:
            # Wait first: a call just started was not cancelled before it began (the attempt's
            # begin checked the job's status).
            stop.wait(self.poll_interval_s)
            with self._guard:
                if not self._watched:
                    self._thread = None
                    return
            try:
                self.check_once()
            except (redis.RedisError, OSError) as exc:
                log.warning("cancel watcher: redis unavailable: %s", exc)


def _is_cancelled(raw: bytes | str) -> bool:
    # Only the status field: a full parse of every in-flight job twice a second is needless work.
    try:
        record = json.loads(raw)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("status") == JobStatus.CANCELLED.value

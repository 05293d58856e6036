"""Delivering a job's callback when it ends: signed as Standard Webhooks, retried with backoff, on
the webhooks pool of its own (`smallfirst worker --pool webhooks`).

The terminal transition puts the job in the webhook outbox in the same transaction that ends it
(store.py), so a callback survives any crash: the delivery task removes the entry once it is
done, and the sweeper re-publishes entries left behind.

A receiver is untrusted. One delivery has a total deadline (connect, TLS, send, the response's
headers and body together: a receiver that answers a byte every few seconds cannot stretch it), at
most `max_response_bytes` of its answer are read, and at most `max_per_host` deliveries to one
host run at once over the whole pool (a Redis-held slot each), so one slow receiver holds a few
threads of this pool and nothing of any other tenant or of the job pools.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpcore
import httpx
import redis as redis_lib
from celery import Celery
from celery import Task as CeleryTask
from pydantic import Field

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobNotFound, JobStore
from smallfirst.common.tenants import TenantNotFound, TenantRegistry
from smallfirst.common.webhooks import CallbackUrlRefused, Resolver, check_callback_url, signature_headers
from smallfirst.common.worker_app import (
    RETRYABLE_ERRORS,
    PoolBootstrap,
    install_pool_runtime,
    pool_redis,
    retry_countdown_s,
)

log = logging.getLogger(__name__)

# Seconds before try n+1; the last value repeats. About 2 h in all with the default 8 tries.
BACKOFF_S = (5, 30, 120, 300, 600, 1200, 1800, 3600)
# The outbox entry is pushed past the retry's due time by this much, so the sweeper only steps in
# when the retry message itself was lost.
OUTBOX_GRACE_S = 120


# A receiver already at its cap of concurrent deliveries: the message comes back after this (plus
# jitter) without counting as a try.
HOST_BUSY_RETRY_S = 5.0
# A host slot outlives the delivery's deadline by this much, so a worker killed mid-delivery frees it.
HOST_SLOT_GRACE_S = 30.0

# Takes one of a host's delivery slots unless all are held; slots past their expiry are freed first.
# KEYS[1]: the host's slots; ARGV: now, expires_at, token, cap, ttl_s.
_ACQUIRE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[4]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


class DeliveryResult(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GAVE_UP = "gave_up"
    NOTHING_TO_DO = "nothing_to_do"


@dataclass(frozen=True)
class DeliveryOutcome:
    result: DeliveryResult
    retry_in_s: float = 0.0
    detail: str = ""


def backoff_s(tries_done: int) -> float:
    return BACKOFF_S[min(tries_done, len(BACKOFF_S) - 1)]


# ---- The total deadline of one delivery -----------------------------------------------------------
# httpx's timeouts bound each socket operation, not the sum: a receiver sending one byte of its
# status line every few seconds never trips a read timeout. Every socket operation of the delivery
# client is given at most what is left of the calling thread's deadline instead, and fails once it
# is spent; the connection pool is shared between threads, the deadline is the caller's.
_deadline = threading.local()


@contextlib.contextmanager
def deadline_scope(deadline_s: float) -> Iterator[None]:
    _deadline.at = time.monotonic() + deadline_s
    try:
        yield
    finally:
        _deadline.at = None


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return timeout
    remaining = at - time.monotonic()
    if remaining <= 0:
        raise error("the delivery's deadline passed")
    return remaining if timeout is None else min(timeout, remaining)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _bounded(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Any = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _bounded(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def delivery_http_client(deadline_s: float, max_connections: int) -> httpx.Client:
    """The pool's HTTP client: every socket operation bounded by the calling delivery's deadline
    (`deadline_scope`). Redirects are not followed: one could lead to an address the URL check refused."""
    transport = httpx.HTTPTransport(limits=httpx.Limits(max_connections=max_connections))
    # httpx has no public hook for httpcore's network backend; its pool keeps it in one attribute.
    pool = transport._pool
    if not hasattr(pool, "_network_backend"):
        raise RuntimeError("this httpcore version keeps no _network_backend: the delivery deadline needs it")
    pool._network_backend = _DeadlineBackend()
    return httpx.Client(transport=transport, timeout=deadline_s, follow_redirects=False)


class WebhookDelivery:
    def __init__(self, store: JobStore, tenants: TenantRegistry, http: httpx.Client, *, allow_private: bool,
                 max_attempts: int, resolver: Resolver | None = None, deadline_s: float = 10.0,
                 max_response_bytes: int = 64 * 1024, max_per_host: int = 4) -> None:
        self.store = store
        self.tenants = tenants
        self.http = http
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.resolver = resolver
        self.deadline_s = deadline_s
        self.max_response_bytes = max_response_bytes
        self.max_per_host = max_per_host
        self._acquire_slot = store.redis.register_script(_ACQUIRE_SLOT)

    def tries_done(self, job_id: str) -> int:
        """Tries recorded for this job's callback: the count survives a re-published message."""
        raw = self.store.redis.hget(k.webhook_delivery_key(job_id), "tries")
        return int(raw) if raw is not None else 0

    def deliver(self, job_id: str, tries_done: int) -> DeliveryOutcome:
        redis = self.store.redis
        try:
            job = self.store.get(job_id)
            tenant = self.tenants.get(job.tenant)
        except (JobNotFound, TenantNotFound):
            redis.zrem(k.WEBHOOK_OUTBOX_KEY, job_id)
            return DeliveryOutcome(DeliveryResult.NOTHING_TO_DO, detail="job or tenant gone")
        if not job.status.terminal or not job.callback_url:
            redis.zrem(k.WEBHOOK_OUTBOX_KEY, job_id)
            return DeliveryOutcome(DeliveryResult.NOTHING_TO_DO, detail="job has not ended or has no callback")
        try:
            # Checked again at send time: the name may resolve elsewhere than when the job was submitted.
            addresses = check_callback_url(job.callback_url, self.allow_private or tenant.allow_private_callbacks,
                                           resolver=self.resolver)
        except CallbackUrlRefused as exc:
            return self._give_up(job_id, tries_done + 1, f"refused: {exc}")
        # The cap is per receiver: scheme, host and port (two receivers on one address are two).
        url = httpx.URL(job.callback_url)
        host = f"{url.scheme}://{(url.host or '').lower()}:{url.port or (443 if url.scheme == 'https' else 80)}"
        with self._host_slot(host) as slot:
            if not slot:
                wait_s = HOST_BUSY_RETRY_S * (1 + random.random())
                redis.zadd(k.WEBHOOK_OUTBOX_KEY, {job_id: time.time() + wait_s + OUTBOX_GRACE_S}, xx=True)
                return DeliveryOutcome(DeliveryResult.RETRY, retry_in_s=wait_s,
                                       detail=f"{self.max_per_host} deliveries to {host} already in flight")
            body = json.dumps({"type": f"job.{job.status.value}", "timestamp": job.updated_at,
                               "data": job.public()}, separators=(",", ":"), ensure_ascii=False)
            # The same id on every try, so that receivers can drop duplicates; a replayed job's new
            # end is a new message.
            msg_id = f"msg_{job.id}" if job.replays == 0 else f"msg_{job.id}_{job.replays}"
            headers = {"content-type": "application/json", **signature_headers(tenant.webhook_secret, msg_id, body)}
            try:
                with deadline_scope(self.deadline_s):
                    status = self._post(job.callback_url, addresses, body.encode(), headers)
                detail = f"HTTP {status}"
            except httpx.TimeoutException as exc:
                status, detail = 0, f"{type(exc).__name__}: no answer within the {self.deadline_s:g} s deadline"
            except httpx.HTTPError as exc:
                status, detail = 0, f"{type(exc).__name__}: {exc}"
        tries = tries_done + 1
        self._record(job_id, tries, status, detail)
        if 200 <= status < 300:
            redis.zrem(k.WEBHOOK_OUTBOX_KEY, job_id)
            return DeliveryOutcome(DeliveryResult.DELIVERED, detail=detail)
        if tries >= self.max_attempts:
            return self._give_up(job_id, tries, detail)
        wait_s = backoff_s(tries_done)
        redis.zadd(k.WEBHOOK_OUTBOX_KEY, {job_id: time.time() + wait_s + OUTBOX_GRACE_S}, xx=True)
        return DeliveryOutcome(DeliveryResult.RETRY, retry_in_s=wait_s, detail=detail)

    @contextlib.contextmanager
    def _host_slot(self, host: str) -> Iterator[bool]:
        key = k.webhook_host_slots_key(host)
        token = uuid.uuid4().hex
        now = time.time()
        ttl_s = int(self.deadline_s + HOST_SLOT_GRACE_S) + 1
        acquired = bool(self._acquire_slot(keys=[key], args=[now, now + self.deadline_s + HOST_SLOT_GRACE_S, token,
                                                             self.max_per_host, ttl_s]))
        try:
            yield acquired
        finally:
            if acquired:
                self.store.redis.zrem(key, token)

    def _post(self, url: str, addresses: list[str], body: bytes, headers: dict[str, str]) -> int:
        """POST to one of the addresses the URL check approved, not to whatever the name resolves
        to a moment later (DNS rebinding: a public answer for the check, a private one for the
        connection). The Host header and TLS (SNI, certificate) still use the URL's host name.
        Returns the status code."""
        if not addresses:  # private targets allowed: nothing was checked, nothing to pin
            return self._send(httpx.URL(url), body, headers, None)
        target = httpx.URL(url)
        pinned_headers = {**headers, "host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else None
        refused: httpx.ConnectError | None = None
        for address in addresses:
            try:
                return self._send(target.copy_with(host=address), body, pinned_headers, extensions)
            except httpx.ConnectError as exc:  # the next address, as a resolver-driven client would
                refused = exc
        assert refused is not None
        raise refused

    def _send(self, url: httpx.URL, body: bytes, headers: dict[str, str], extensions: dict[str, str] | None) -> int:
        with self.http.stream("POST", url, content=body, headers=headers, extensions=extensions) as response:
            # The status is the receiver's answer. Of its body at most max_response_bytes are read,
            # within the deadline; a body cut short or late changes nothing about that answer.
            read = 0
            try:
                # (A response built in memory, e.g. by a test transport, has nothing left to stream.)
                for chunk in ([] if response.is_stream_consumed else response.iter_raw()):
                    read += len(chunk)
                    if read >= self.max_response_bytes:
                        break
            except httpx.HTTPError as exc:
                log.info("webhook receiver %s: body not read to its end: %s", url.host, exc)
            return response.status_code

    def _record(self, job_id: str, tries: int, status: int, detail: str) -> None:
        key = k.webhook_delivery_key(job_id)
        self.store.redis.hset(key, mapping={"tries": tries, "last_status": status, "last_detail": detail[:300],
                                            "last_try_at": time.time()})
        self.store.redis.expire(key, self.store.retention_s)

    def _give_up(self, job_id: str, tries: int, detail: str) -> DeliveryOutcome:
        log.warning("job %s: giving up on its callback after %s tries: %s", job_id, tries, detail)
        self.store.redis.zrem(k.WEBHOOK_OUTBOX_KEY, job_id)
        self.store.redis.hset(k.webhook_delivery_key(job_id), mapping={"gave_up": 1, "last_detail": detail[:300]})
        self.store.redis.expire(k.webhook_delivery_key(job_id), self.store.retention_s)
        return DeliveryOutcome(DeliveryResult.GAVE_UP, detail=detail)


class WebhookWorkerSettings(CoreSettings):
    """Settings of the webhooks pool (env prefix SMALLFIRST_). `webhook_timeout_s` (CoreSettings) is
    the total deadline of one delivery."""

    # Threads per worker process: deliveries in flight at once (each waits on a receiver).
    concurrency: int = Field(default=32, gt=0)
    # Prometheus metrics of this process; 0: none.
    metrics_port: int = Field(default=k.DEFAULT_METRICS_PORT_WEBHOOK_WORKER, ge=0, le=65535)
    # Bytes of a receiver's answer read at most; its status is all the delivery needs.
    webhook_max_response_bytes: int = Field(default=64 * 1024, ge=0)
    # Deliveries to one receiver host in flight at once, over the whole pool.
    webhook_max_per_host: int = Field(default=4, gt=0)


def build_delivery(settings: WebhookWorkerSettings, client: redis_lib.Redis) -> WebhookDelivery:
    store = JobStore(client, retention_s=settings.job_retention_s, stale_after_s=settings.sweep_stale_after_s)
    return WebhookDelivery(store, TenantRegistry(client),
                           delivery_http_client(settings.webhook_timeout_s, max_connections=settings.concurrency),
                           allow_private=settings.allow_private_callbacks, max_attempts=settings.webhook_max_attempts,
                           deadline_s=settings.webhook_timeout_s,
                           max_response_bytes=settings.webhook_max_response_bytes,
                           max_per_host=settings.webhook_max_per_host)


def register_webhook_task(app: Celery, delivery: PoolBootstrap[WebhookDelivery]) -> None:
    """The `deliver_webhook` task, for the pool that consumes the webhooks queue."""

    @app.task(name=k.TASK_DELIVER_WEBHOOK, bind=True)
    def deliver_webhook(self: CeleryTask, job_id: str) -> str:
        runtime = delivery.get()
        try:
            outcome = runtime.deliver(job_id, tries_done=runtime.tries_done(job_id))
        except RETRYABLE_ERRORS as exc:
            raise self.retry(exc=exc, countdown=retry_countdown_s(self.request.retries), max_retries=None) from exc
        if outcome.result is DeliveryResult.RETRY:
            raise self.retry(countdown=outcome.retry_in_s, max_retries=None)
        return outcome.result.value


def make_worker_app(settings: WebhookWorkerSettings) -> Celery:
    """The webhooks pool: only callback deliveries, so that a slow receiver never holds a thread
    that a job needs. It runs no sweeper (the job pools do)."""
    app = make_celery(settings)
    bootstrap: PoolBootstrap[WebhookDelivery] = PoolBootstrap(
        k.POOL_WEBHOOKS, lambda: build_delivery(settings, pool_redis(settings)))
    register_webhook_task(app, bootstrap)
    # httpx: the deliveries' client spans.
    install_pool_runtime(app, settings, k.POOL_WEBHOOKS, bootstrap, metrics_port=settings.metrics_port,
                         instrument=[telemetry.instrument_httpx])
    return app

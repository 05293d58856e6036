"""Delivering a job's callback when it ends: signed as Standard Webhooks, retried with backoff.

The terminal transition puts the job in the webhook outbox in the same transaction that ends it
(store.py), so a callback survives any crash: the delivery task removes the entry once it is
done, and the sweeper re-publishes entries left behind.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import httpx
import redis as redis_lib
from celery import Celery
from celery import Task as CeleryTask

from smallfirst.common import constants as k
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobNotFound, JobStore
from smallfirst.common.tenants import TenantNotFound, TenantRegistry
from smallfirst.common.webhooks import CallbackUrlRefused, Resolver, check_callback_url, signature_headers
from smallfirst.common.worker_app import RETRYABLE_ERRORS, Lazy, retry_countdown_s

log = logging.getLogger(__name__)

# Seconds before try n+1; the last value repeats. About 2 h in all with the default 8 tries.
BACKOFF_S = (5, 30, 120, 300, 600, 1200, 1800, 3600)
# The outbox entry is pushed past the retry's due time by this much, so the sweeper only steps in
# when the retry message itself was lost.
OUTBOX_GRACE_S = 120


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


class WebhookDelivery:
    def __init__(self, store: JobStore, tenants: TenantRegistry, http: httpx.Client, *, allow_private: bool,
                 max_attempts: int, resolver: Resolver | None = None) -> None:
        self.store = store
        self.tenants = tenants
        self.http = http
        self.allow_private = allow_private
        self.max_attempts = max_attempts
        self.resolver = resolver

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
        body = json.dumps({"type": f"job.{job.status.value}", "timestamp": job.updated_at, "data": job.public()},
                          separators=(",", ":"), ensure_ascii=False)
        # The same id on every try, so that receivers can drop duplicates.
        msg_id = f"msg_{job.id}"
        headers = {"content-type": "application/json", **signature_headers(tenant.webhook_secret, msg_id, body)}
        try:
            response = self._post(job.callback_url, addresses, body.encode(), headers)
            status, detail = response.status_code, f"HTTP {response.status_code}"
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

    def _post(self, url: str, addresses: list[str], body: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST to one of the addresses the URL check approved, not to whatever the name resolves
        to a moment later (DNS rebinding: a public answer for the check, a private one for the
        connection). The Host header and TLS (SNI, certificate) still use the URL's host name."""
        if not addresses:  # private targets allowed: nothing was checked, nothing to pin
            return self.http.post(url, content=body, headers=headers)
        target = httpx.URL(url)
        pinned_headers = {**headers, "host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else None
        refused: httpx.ConnectError | None = None
        for address in addresses:
            try:
                return self.http.post(target.copy_with(host=address), content=body, headers=pinned_headers,
                                      extensions=extensions)
            except httpx.ConnectError as exc:  # the next address, as a resolver-driven client would
                refused = exc
        assert refused is not None
        raise refused

    def _record(self, job_id: str, tries: int, status: int, detail: str) -> None:
        key = k.webhook_delivery_key(job_id)
        self.store.redis.hset(key, mapping={"tries": tries, "last_status": status, "last_detail": detail[:300],
                                            "last_try_at": time.time()})
        self.store.redis.expire(key, self.store.retention_s)

    def _give_up(self, job_id: str, tries: int, detail: str) -> DeliveryOutcome:
        log.warning("job %s: giving up on its callback after %s tries: %s", job_id, tries, detail)
        self.store.redis.zrem(k.WEBHOOK_OUTBOX_KEY, job_id)
        self.store.redis.hset(k.webhook_delivery_key(job_id), mapping={"gave_up": 1, "last_detail": detail[:300]})
        return DeliveryOutcome(DeliveryResult.GAVE_UP, detail=detail)


def register_webhook_task(app: Celery, settings: CoreSettings) -> None:
    """The `deliver_webhook` task, for the pool that consumes the webhooks queue."""

    def build() -> WebhookDelivery:
        client = redis_lib.Redis.from_url(settings.redis_url, health_check_interval=10)
        store = JobStore(client, retention_s=settings.job_retention_s, stale_after_s=settings.sweep_stale_after_s)
        # Redirects are not followed: a redirect could lead to an address the URL check refused.
        http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        return WebhookDelivery(store, TenantRegistry(client), http, allow_private=settings.allow_private_callbacks,
                               max_attempts=settings.webhook_max_attempts)

    delivery: Lazy[WebhookDelivery] = Lazy(build)

    @app.task(name=k.TASK_DELIVER_WEBHOOK, bind=True)
    def deliver_webhook(self: CeleryTask, job_id: str) -> str:
        try:
            outcome = delivery.get().deliver(job_id, tries_done=self.request.retries)
        except RETRYABLE_ERRORS as exc:
            raise self.retry(exc=exc, countdown=retry_countdown_s(self.request.retries), max_retries=None) from exc
        if outcome.result is DeliveryResult.RETRY:
            raise self.retry(countdown=outcome.retry_in_s, max_retries=None)
        return outcome.result.value

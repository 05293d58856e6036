"""Webhook delivery connects to the addresses the URL check approved (no DNS rebinding)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import httpx
import pytest
import redis

from smallfirst.common import lifecycle
from smallfirst.common.delivery import DeliveryResult, WebhookDelivery
from smallfirst.common.jobs import ErrorInfo, Job, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry

PUBLIC_A, PUBLIC_B = "93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), retention_s=3600, stale_after_s=600)


def ended_job(store: JobStore, callback_url: str) -> Job:
    """A job of tenant t1 that failed, its callback due."""
    TenantRegistry(store.redis).create("acme", tenant_id="t1")
    now = time.time()
    job = Job(id=new_job_id(), tenant="t1", task="banking77_intent", input={"text": "where is my card"},
              route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT), created_at=now, updated_at=now,
              queued_at=now, callback_url=callback_url)
    store.create(job)
    _, running = store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.SMALL, model="m", worker="w", task_id="d1", now=now, lease_s=60))
    store.transition(job.id, lambda j: lifecycle.fail(j, lifecycle.AttemptEnd(
        attempt_number=running.attempts[-1].number, task_id="d1", now=time.time()),
        error=ErrorInfo(code="validation_failed", message="no")))
    return job


def delivery(store: JobStore, handler: Callable[[httpx.Request], httpx.Response],
             resolved: dict[str, Sequence[str]]) -> WebhookDelivery:
    return WebhookDelivery(store, TenantRegistry(store.redis), httpx.Client(transport=httpx.MockTransport(handler)),
                           allow_private=False, max_attempts=3, resolver=lambda host, port: resolved[host])


def test_callback_goes_to_the_checked_address_with_the_urls_host_for_http_and_tls(store: JobStore) -> None:
    # given: a host name that resolved to a public address when it was checked
    job = ended_job(store, "https://hooks.example.com:8443/smallfirst?x=1")
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    # when
    outcome = delivery(store, receiver, {"hooks.example.com": [PUBLIC_A]}).deliver(job.id, tries_done=0)

    # then: connected to that address; Host, SNI and certificate checks use the name
    assert outcome.result is DeliveryResult.DELIVERED
    [request] = seen
    assert (request.url.host, request.url.port, request.url.raw_path) == (PUBLIC_A, 8443, b"/smallfirst?x=1")
    assert request.headers["host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.headers["webhook-id"] == f"msg_{job.id}"


def test_next_checked_address_is_tried_when_one_refuses_the_connection(store: JobStore) -> None:
    # given: two public addresses, the first refusing connections
    job = ended_job(store, "http://hooks.example.com/x")
    tried: list[str] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        tried.append(request.url.host)
        if request.url.host == PUBLIC_A:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200)

    # when
    outcome = delivery(store, receiver, {"hooks.example.com": [PUBLIC_A, PUBLIC_B]}).deliver(job.id, tries_done=0)

    # then
    assert outcome.result is DeliveryResult.DELIVERED
    assert tried == [PUBLIC_A, PUBLIC_B]


def test_name_that_now_resolves_to_a_private_address_gets_nothing(store: JobStore) -> None:
    # given: the name resolves to a private address at send time (rebinding after submission)
    job = ended_job(store, "https://hooks.example.com/x")
    seen: list[httpx.Request] = []

    def receiver(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    # when
    outcome = delivery(store, receiver, {"hooks.example.com": [PUBLIC_A, "10.1.2.3"]}).deliver(job.id, tries_done=0)

    # then
    assert outcome.result is DeliveryResult.GAVE_UP
    assert "10.1.2.3" in outcome.detail
    assert seen == []

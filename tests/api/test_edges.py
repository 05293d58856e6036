"""The API's edges under hostile or careless clients: callback lookups only after quota (and
bounded), oversized request heads, too many long-polls, and readiness without internal detail."""

from __future__ import annotations

import asyncio
import socket
import threading

import httpx
import pytest

from smallfirst.api.callbacks import CallbackChecker
from smallfirst.api.errors import ApiError
from smallfirst.common.tenants import IssuedTenant
from tests.api_fixtures import ApiServerFactory, TenantFactory
from tests.support.redis_server import RedisServer

BANKING = {"task": "banking77_intent", "input": {"text": "Where is my card?"}}


def bearer(tenant: IssuedTenant) -> dict[str, str]:
    return {"Authorization": f"Bearer {tenant.api_key}"}


def test_a_tenant_over_its_quota_gets_429_before_its_callback_host_is_looked_up(
        api_server_factory: ApiServerFactory, tenant_factory: TenantFactory) -> None:
    # given: a tenant whose quota is used up, and a callback URL that would be refused once resolved
    server = api_server_factory(allow_private_callbacks="false")
    tenant = tenant_factory("acme", quota_jobs_per_minute=1)
    assert httpx.post(f"{server.url}/v1/jobs", json=BANKING, headers=bearer(tenant)).status_code == 202

    # when
    response = httpx.post(f"{server.url}/v1/jobs", json={**BANKING, "callback_url": "http://10.0.0.1/hook"},
                          headers=bearer(tenant))

    # then: the quota answered, so no lookup was spent on the request
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"


def test_a_refused_callback_gives_its_quota_back(api_server_factory: ApiServerFactory,
                                                 tenant_factory: TenantFactory) -> None:
    # given: a tenant allowed one job per minute
    server = api_server_factory(allow_private_callbacks="false")
    tenant = tenant_factory("acme", quota_jobs_per_minute=1)

    # when: a submission whose callback is refused, then a good one
    refused = httpx.post(f"{server.url}/v1/jobs", json={**BANKING, "callback_url": "http://10.0.0.1/hook"},
                         headers=bearer(tenant))
    accepted = httpx.post(f"{server.url}/v1/jobs", json=BANKING, headers=bearer(tenant))

    # then
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "callback_url_not_allowed"
    assert accepted.status_code == 202


def test_a_batch_item_with_a_refused_callback_is_rejected_alone_and_refunded(
        api_server_factory: ApiServerFactory, tenant_factory: TenantFactory) -> None:
    # given: quota for two jobs
    server = api_server_factory(allow_private_callbacks="false")
    tenant = tenant_factory("acme", quota_jobs_per_minute=2)
    batch = {"jobs": [BANKING, {**BANKING, "callback_url": "http://[64:ff9b::a00:1]/hook"}]}

    # when
    response = httpx.post(f"{server.url}/v1/jobs/batch", json=batch, headers=bearer(tenant))
    after = httpx.post(f"{server.url}/v1/jobs", json=BANKING, headers=bearer(tenant))

    # then: one accepted, the NAT64 one refused, and its quota left for the next job
    assert response.status_code == 202
    body = response.json()
    assert [r["status"] for r in body["results"]] == [202, 422]
    assert body["results"][1]["error"]["code"] == "callback_url_not_allowed"
    assert after.status_code == 202


def test_a_callback_host_that_does_not_answer_in_time_is_refused_without_holding_the_caller() -> None:
    # given: a resolver that hangs (a name server that never answers)
    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(30)
        raise OSError("timed out")

    checker = CallbackChecker(max_concurrency=2, max_pending=8, timeout_s=0.2, resolver=hanging)

    # when
    try:
        refused = asyncio.run(checker.check_addresses(["https://slow.example.com/hook"]))
    finally:
        release.set()
        checker.close()

    # then
    assert refused["https://slow.example.com/hook"].code == "callback_url_not_allowed"
    assert "did not resolve within" in refused["https://slow.example.com/hook"].message


def test_callback_lookups_beyond_the_pending_bound_are_503_with_retry_after() -> None:
    # given: two lookups hanging, and a bound of two in flight
    release = threading.Event()

    def hanging(host: str, port: int) -> list[str]:
        release.wait(30)
        return ["93.184.216.34"]

    checker = CallbackChecker(max_concurrency=2, max_pending=2, timeout_s=0.2, resolver=hanging)

    async def scenario() -> ApiError:
        await checker.check_addresses(["https://a.example.com/", "https://b.example.com/"])
        # when: a third comes while both still hold their threads (they timed out for their callers)
        with pytest.raises(ApiError) as busy:
            await checker.check_addresses(["https://c.example.com/"])
        return busy.value

    try:
        error = asyncio.run(scenario())
    finally:
        release.set()
        checker.close()

    # then
    assert error.status == 503
    assert error.code == "callback_check_busy"
    assert error.headers["Retry-After"] == "1"


def test_a_request_head_over_the_limit_is_431_in_the_error_shape(api_server_factory: ApiServerFactory,
                                                                 tenant_factory: TenantFactory) -> None:
    # given
    server = api_server_factory(max_header_bytes=8192)
    tenant = tenant_factory("acme")

    # when: one header of 20 MiB, and a normal request after it
    huge = httpx.get(f"{server.url}/v1/jobs", headers={**bearer(tenant), "X-Padding": "a" * (20 * 1024 * 1024)},
                     timeout=30)
    normal = httpx.get(f"{server.url}/v1/jobs", headers=bearer(tenant))

    # then
    assert huge.status_code == 431
    assert huge.json()["error"]["code"] == "request_header_fields_too_large"
    assert huge.json()["error"]["details"] == {"max_header_bytes": 8192}
    assert normal.status_code == 200


def test_long_polls_beyond_the_tenants_cap_are_429_with_retry_after(api_server_factory: ApiServerFactory,
                                                                    tenant_factory: TenantFactory) -> None:
    # given: a cap of two long-polls, two held open on a job that does not end
    server = api_server_factory(long_poll_max_per_tenant=2)
    tenant, other = tenant_factory("acme"), tenant_factory("other")
    job_id = httpx.post(f"{server.url}/v1/jobs", json=BANKING, headers=bearer(tenant)).json()["id"]
    other_job = httpx.post(f"{server.url}/v1/jobs", json=BANKING, headers=bearer(other)).json()["id"]

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response, list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            held = [asyncio.create_task(client.get(f"/v1/jobs/{job_id}", params={"wait": 3}, headers=bearer(tenant)))
                    for _ in range(2)]
            await asyncio.sleep(1.0)  # both are waiting inside the server
            # when: a third long-poll of the tenant, a plain read of it, and another tenant's long-poll
            third = await client.get(f"/v1/jobs/{job_id}", params={"wait": 3}, headers=bearer(tenant))
            plain = await client.get(f"/v1/jobs/{job_id}", headers=bearer(tenant))
            others = await client.get(f"/v1/jobs/{other_job}", params={"wait": 0.1}, headers=bearer(other))
            statuses = [(await task).status_code for task in held]
            return third, plain, others, statuses

    third, plain, others, held_statuses = asyncio.run(scenario())

    # then
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "too_many_long_polls"
    assert third.headers["Retry-After"] == "1"
    assert plain.status_code == 200
    assert others.status_code == 200
    assert held_statuses == [200, 200]


def test_readyz_does_not_tell_where_redis_is_when_it_is_down(api_server: str, redis_server: RedisServer) -> None:
    # given
    assert httpx.get(f"{api_server}/readyz").status_code == 200
    redis_server.kill()
    try:
        # when
        down = httpx.get(f"{api_server}/readyz", timeout=10)
    finally:
        redis_server.restart()

    # then: the verdict only; the error text (host, port, errno) stays in the API's log
    assert down.status_code == 503
    assert down.json()["error"]["details"]["checks"]["redis"] == {"ok": False}
    assert str(redis_server.port) not in down.text
    assert "127.0.0.1" not in down.text
    assert socket.gethostname() not in down.text

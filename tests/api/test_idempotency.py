"""Idempotency-Key: replay, reuse with another body, a repeat while the first is in flight, expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from smallfirst.api.errors import ApiError
from smallfirst.api.idempotency import IdempotencyRecord, IdempotencyStore, StoredResponse, fingerprint
from smallfirst.api.models import JobRequest
from smallfirst.common import constants as k
from smallfirst.common.tenants import IssuedTenant
from tests.api_fixtures import TenantFactory

BANKING = {"task": "banking77_intent", "input": {"text": "Why was I charged twice?"}}


def count_jobs(redis_url: str, tenant_id: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.zcard(k.tenant_jobs_key(tenant_id)))
    finally:
        client.close()


def test_repeat_with_the_same_key_replays_the_first_response(api_client: httpx.Client, redis_url: str,
                                                              tenant: IssuedTenant) -> None:
    # given
    headers = {"Idempotency-Key": "order-17"}
    first = api_client.post("/v1/jobs", json=BANKING, headers=headers)

    # when: the client retries, with the keys of the body in another order
    repeat = api_client.post("/v1/jobs", json=dict(reversed(list(BANKING.items()))), headers=headers)

    # then
    assert first.status_code == 202
    assert "Idempotent-Replayed" not in first.headers
    assert repeat.status_code == 202
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.content == first.content
    assert count_jobs(redis_url, tenant.tenant.id) == 1


def test_same_key_with_a_different_body_is_422(api_client: httpx.Client, redis_url: str,
                                                tenant: IssuedTenant) -> None:
    # given
    headers = {"Idempotency-Key": "order-18"}
    api_client.post("/v1/jobs", json=BANKING, headers=headers)

    # when
    response = api_client.post("/v1/jobs", json={**BANKING, "priority": "high"}, headers=headers)

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert count_jobs(redis_url, tenant.tenant.id) == 1


def test_repeat_while_the_first_request_is_in_flight_is_409(api_client: httpx.Client, redis_url: str,
                                                             tenant: IssuedTenant) -> None:
    # given: the first request with this key holds it (as it does while it is being handled)
    client = redis.Redis.from_url(redis_url)
    marker = IdempotencyRecord.in_flight(fingerprint("POST", "/v1/jobs", _as_parsed(BANKING)))
    client.set(k.idempotency_key(tenant.tenant.id, "order-19"), marker.model_dump_json(), ex=60)
    client.close()

    # when
    response = api_client.post("/v1/jobs", json=BANKING, headers={"Idempotency-Key": "order-19"})

    # then
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "idempotency_key_in_flight"
    assert response.headers["Retry-After"] == "1"
    assert count_jobs(redis_url, tenant.tenant.id) == 0


def test_stored_response_is_kept_for_the_retention_period(
        api_client: httpx.Client, redis_url: str, tenant: IssuedTenant) -> None:
    # given
    api_client.post("/v1/jobs", json=BANKING, headers={"Idempotency-Key": "order-20"})
    client = redis.Redis.from_url(redis_url)

    # when
    ttl_s = client.ttl(k.idempotency_key(tenant.tenant.id, "order-20"))
    client.close()

    # then: the stored response is kept 24 h by default
    assert 23 * 3600 < ttl_s <= 24 * 3600


def test_refused_request_does_not_use_up_its_key(api_client: httpx.Client) -> None:
    # given: a request refused for its content
    headers = {"Idempotency-Key": "order-21"}
    refused = api_client.post("/v1/jobs", json={"task": "nope", "input": {"text": "x"}}, headers=headers)

    # when: the corrected request comes with the same key
    corrected = api_client.post("/v1/jobs", json=BANKING, headers=headers)

    # then
    assert refused.status_code == 422
    assert corrected.status_code == 202
    assert "Idempotent-Replayed" not in corrected.headers


def test_keys_are_per_tenant(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    first, second = tenant_factory("one"), tenant_factory("two")

    # when
    a = httpx.post(f"{api_server}/v1/jobs", json=BANKING, headers={"Authorization": f"Bearer {first.api_key}",
                                                                   "Idempotency-Key": "shared"})
    b = httpx.post(f"{api_server}/v1/jobs", json=BANKING, headers={"Authorization": f"Bearer {second.api_key}",
                                                                   "Idempotency-Key": "shared"})

    # then
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] != b.json()["id"]
    assert "Idempotent-Replayed" not in b.headers


def test_batch_repeat_replays_and_stores_nothing_new(api_client: httpx.Client, redis_url: str,
                                                      tenant: IssuedTenant) -> None:
    # given
    batch = {"jobs": [BANKING, {**BANKING, "priority": "low"}]}
    headers = {"Idempotency-Key": "batch-1"}
    first = api_client.post("/v1/jobs/batch", json=batch, headers=headers)

    # when
    repeat = api_client.post("/v1/jobs/batch", json=batch, headers=headers)

    # then
    assert first.status_code == 202
    assert repeat.headers["Idempotent-Replayed"] == "true"
    assert repeat.json() == first.json()
    assert count_jobs(redis_url, tenant.tenant.id) == 2


def test_invalid_idempotency_key_is_refused(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", json=BANKING, headers={"Idempotency-Key": "k" * 300})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def _as_parsed(body: Mapping[str, object]) -> dict[str, object]:
    """The request as the API parses it (defaults filled in): what its fingerprint covers."""
    return JobRequest.model_validate(body).model_dump(mode="json")


def test_in_flight_claim_holds_the_key_briefly_and_the_response_for_long(redis_url: str) -> None:
    # given: a request whose handling is still going on
    async def scenario() -> tuple[int, str, int]:
        client = aioredis.Redis.from_url(redis_url)
        store = IdempotencyStore(client, ttl_s=3600, in_flight_ttl_s=7)
        entered, release = asyncio.Event(), asyncio.Event()

        async def slow_handler() -> StoredResponse:
            entered.set()
            await release.wait()
            return StoredResponse(202, b'{"id": "job_1"}')

        first = asyncio.create_task(store.run("t1", "key-1", "same-request", slow_handler))
        await entered.wait()
        # when: the key is looked at, and repeated, while the first request is in flight
        claim_ttl_s = await client.ttl(k.idempotency_key("t1", "key-1"))
        with pytest.raises(ApiError) as repeat:
            await store.run("t1", "key-1", "same-request", slow_handler)
        release.set()
        await first
        stored_ttl_s = await client.ttl(k.idempotency_key("t1", "key-1"))
        await client.aclose()  # type: ignore[attr-defined]
        return claim_ttl_s, repeat.value.code, stored_ttl_s

    claim_ttl_s, code, stored_ttl_s = asyncio.run(scenario())

    # then: a process dying mid-request would free the key within seconds, not a day
    assert 0 < claim_ttl_s <= 7
    assert code == "idempotency_key_in_flight"
    assert 7 < stored_ttl_s <= 3600

"""Idempotency-Key: replay, reuse with another body, a repeat while the first is in flight, expiry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from smallfirst.api.errors import ApiError, json_bytes
from smallfirst.api.idempotency import IdempotencyRecord, IdempotencyStore, Receipt, StoredResponse, fingerprint
from smallfirst.api.models import JobRequest
from smallfirst.common import constants as k
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.store import AsyncJobStore
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

        async def slow_handler(_: object) -> StoredResponse:
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


def _unknown_outcome_scenario(redis_url: str, *, applied: bool) -> tuple[StoredResponse | ApiError, int]:
    """A first request whose store fails after (or before) its transaction applied, as when Redis
    dies between executing EXEC and sending the reply; then a repeat, and the jobs stored."""
    async def scenario() -> tuple[StoredResponse | ApiError, int]:
        client = aioredis.Redis.from_url(redis_url)
        store = IdempotencyStore(client, ttl_s=3600, in_flight_ttl_s=30)
        jobs = AsyncJobStore(client, retention_s=3600, stale_after_s=900)
        job = make_job()

        async def handler_whose_store_reply_is_lost(receipt: Receipt) -> StoredResponse:
            write = receipt.store_with_effect(202, json_bytes(job.public()))
            assert write is not None
            if applied:
                await jobs.create_many([job], [write])
            raise redis.ConnectionError("Connection closed by server.")

        async def handler_that_must_not_run(receipt: Receipt) -> StoredResponse:
            raise AssertionError("the repeat ran the request a second time")

        with contextlib.suppress(redis.ConnectionError):
            await store.run("t1", "order-77", "same-request", handler_whose_store_reply_is_lost)
        # when: the client retries with its key
        try:
            repeat: StoredResponse | ApiError = await store.run("t1", "order-77", "same-request",
                                                                handler_that_must_not_run)
        except ApiError as exc:
            repeat = exc
        stored = await client.zcard(k.tenant_jobs_key("t1"))
        await client.aclose()  # type: ignore[attr-defined]
        return repeat, int(stored)

    return asyncio.run(scenario())


def test_unknown_outcome_whose_transaction_applied_replays_the_stored_response(redis_url: str) -> None:
    # given / when: the job and its response were stored, but the reply to EXEC was lost
    repeat, stored = _unknown_outcome_scenario(redis_url, applied=True)

    # then: the repeat gets the first response, and there is one job
    assert isinstance(repeat, StoredResponse)
    assert repeat.status == 202
    assert repeat.replayed
    assert stored == 1


def test_unknown_outcome_keeps_the_key_reserved_with_retry_after_until_the_claim_expires(redis_url: str) -> None:
    # given / when: the store failed before its transaction applied (the outcome is unknown to the API)
    repeat, stored = _unknown_outcome_scenario(redis_url, applied=False)

    # then: the key is not freed (a retry could otherwise create a second job): 409 with Retry-After
    assert isinstance(repeat, ApiError)
    assert repeat.status == 409
    assert repeat.code == "idempotency_key_in_flight"
    assert repeat.details["outcome"] == "unknown"
    assert 1 <= int(repeat.headers["Retry-After"]) <= 30
    assert stored == 0


def test_once_an_unknown_outcome_claim_expires_the_retry_creates_the_job_once(redis_url: str) -> None:
    # given: an unknown outcome whose transaction did not apply, and its claim since expired
    _unknown_outcome_scenario(redis_url, applied=False)
    client = redis.Redis.from_url(redis_url)
    client.delete(k.idempotency_key("t1", "order-77"))  # what its TTL does after in_flight_ttl_s

    # when
    async def retry() -> StoredResponse:
        aclient = aioredis.Redis.from_url(redis_url)
        store = IdempotencyStore(aclient, ttl_s=3600, in_flight_ttl_s=30)
        jobs = AsyncJobStore(aclient, retention_s=3600, stale_after_s=900)
        job = make_job()

        async def handler(receipt: Receipt) -> StoredResponse:
            write = receipt.store_with_effect(202, json_bytes(job.public()))
            assert write is not None
            await jobs.create_many([job], [write])
            assert receipt.prepared is not None
            return receipt.prepared

        try:
            return await store.run("t1", "order-77", "same-request", handler)
        finally:
            await aclient.aclose()  # type: ignore[attr-defined]

    response = asyncio.run(retry())

    # then: handled afresh, stored once, and its response kept for repeats
    assert response.status == 202
    assert not response.replayed
    assert client.zcard(k.tenant_jobs_key("t1")) == 1
    assert b'"state":"done"' in (client.get(k.idempotency_key("t1", "order-77")) or b"")
    client.close()


def test_a_record_stored_with_the_jobs_holds_their_ids_counts_its_bytes_and_renders_them_as_they_are_now(
        redis_url: str) -> None:
    # given a handler that stores its job and the key's record in one transaction, with a renderer
    async def scenario() -> tuple[StoredResponse, StoredResponse, dict[str, object], int, int]:
        client = aioredis.Redis.from_url(redis_url)
        store = IdempotencyStore(client, ttl_s=3600, in_flight_ttl_s=30)
        jobs = AsyncJobStore(client, retention_s=3600, stale_after_s=900)
        job = make_job()
        rendered: list[dict[str, object]] = []

        async def render(replay: dict[str, object]) -> bytes:
            rendered.append(replay)
            return json_bytes((await jobs.get(str(replay["job"]))).public())

        async def handler(receipt: Receipt) -> StoredResponse:
            write = receipt.store_with_effect(202, json_bytes(job.public()), replay={"job": job.id})
            assert write is not None
            await jobs.create_many([job], [write])
            assert receipt.prepared is not None
            return receipt.prepared

        async def handler_that_must_not_run(receipt: Receipt) -> StoredResponse:
            raise AssertionError("the repeat ran the request a second time")

        # when it is handled, and then repeated
        first = await store.run("t1", "order-9", "same-request", handler, render=render)
        repeat = await store.run("t1", "order-9", "same-request", handler_that_must_not_run, render=render)
        raw = await client.get(k.idempotency_key("t1", "order-9"))
        counted = await client.hget(k.usage_bytes_key("t1"), "idem:order-9")
        await client.aclose()  # type: ignore[attr-defined]
        assert raw is not None
        assert rendered == [{"job": job.id}]
        record = IdempotencyRecord.model_validate_json(raw)
        return first, repeat, record.model_dump(), len(raw), int(counted or 0)

    first, repeat, record, record_bytes, counted_bytes = asyncio.run(scenario())

    # then the record keeps the status and the job id, not the body, and its bytes count against the tenant
    assert record["replay"] is not None
    assert record["body"] is None
    assert counted_bytes == record_bytes
    # and the repeat answers the same status with the job as stored now
    assert not first.replayed
    assert repeat.replayed
    assert repeat.status == 202
    assert b'"id"' in repeat.body


def make_job() -> Job:
    now = time.time()
    return Job(id=new_job_id(), tenant="t1", task="banking77_intent", input={"text": "hi"},
               route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT), created_at=now,
               updated_at=now, queued_at=now)

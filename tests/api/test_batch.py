"""POST /v1/jobs/batch: per-item results, all-or-nothing, the batch size limit."""

from __future__ import annotations

import httpx
import redis

from smallfirst.common import constants as k
from smallfirst.common.tenants import IssuedTenant
from tests.api.test_submit import queued_job_ids
from tests.api_fixtures import ApiServerFactory, TenantFactory

GOOD = {"task": "banking77_intent", "input": {"text": "How do I top up by bank transfer?"}}


def stored_job_ids(redis_url: str, tenant_id: str) -> set[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {i.decode() for i in client.zrange(k.tenant_jobs_key(tenant_id), 0, -1)}
    finally:
        client.close()


def test_batch_accepts_the_good_items_and_reports_the_bad_ones(api_client: httpx.Client, redis_url: str,
                                                               tenant: IssuedTenant) -> None:
    # given
    batch = {"jobs": [
        GOOD,
        {"task": "nope", "input": {"text": "x"}},
        {**GOOD, "priority": "low"},
        {"task": "banking77_intent", "input": {"text": 5}},
        {"task": "banking77_intent", "input": {"text": "y" * 2001}},
    ]}

    # when
    response = api_client.post("/v1/jobs/batch", json=batch)

    # then
    assert response.status_code == 202
    body = response.json()
    assert (body["accepted"], body["rejected"]) == (2, 3)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in results] == [202, 422, 202, 422, 422]
    assert [r["error"]["code"] if r["error"] else None for r in results] == [
        None, "unknown_task", None, "invalid_request", "input_too_long"]
    assert results[3]["error"]["details"][0]["field"] == "jobs.3.input.text"
    accepted = {results[0]["job"]["id"], results[2]["job"]["id"]}
    assert stored_job_ids(redis_url, tenant.tenant.id) == accepted
    assert set(queued_job_ids(redis_url, k.QUEUE_SMALL)) == accepted


def test_all_or_nothing_batch_with_one_bad_item_stores_nothing(api_client: httpx.Client, redis_url: str,
                                                               tenant: IssuedTenant) -> None:
    # given
    batch = {"all_or_nothing": True, "jobs": [GOOD, GOOD, {"task": "nope", "input": {"text": "x"}}]}

    # when
    response = api_client.post("/v1/jobs/batch", json=batch)

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "batch_rejected"
    assert [(r["index"], r["error"]["code"]) for r in error["details"]["results"]] == [(2, "unknown_task")]
    assert stored_job_ids(redis_url, tenant.tenant.id) == set()
    assert queued_job_ids(redis_url, k.QUEUE_SMALL) == []


def test_all_or_nothing_batch_of_good_items_is_accepted_whole(api_client: httpx.Client, redis_url: str,
                                                              tenant: IssuedTenant) -> None:
    # when
    response = api_client.post("/v1/jobs/batch", json={"all_or_nothing": True, "jobs": [GOOD] * 5})

    # then
    assert response.status_code == 202
    assert response.json()["accepted"] == 5
    assert len(stored_job_ids(redis_url, tenant.tenant.id)) == 5


def test_batch_over_the_size_limit_is_refused_whole(api_server_factory: ApiServerFactory,
                                                    tenant_factory: TenantFactory, redis_url: str) -> None:
    # given
    server = api_server_factory(max_batch_jobs=3)
    credentials = tenant_factory("acme")

    # when
    response = httpx.post(f"{server.url}/v1/jobs/batch", json={"jobs": [GOOD] * 4},
                          headers={"Authorization": f"Bearer {credentials.api_key}"})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "batch_too_large"
    assert stored_job_ids(redis_url, credentials.tenant.id) == set()


def test_batch_of_only_bad_items_is_422_with_every_item_error(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs/batch", json={"jobs": [{"task": "nope", "input": {}}, {"bogus": 1}]})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "batch_rejected"
    assert [r["index"] for r in error["details"]["results"]] == [0, 1]


def test_empty_batch_or_unknown_batch_field_is_invalid(api_client: httpx.Client) -> None:
    # when
    empty = api_client.post("/v1/jobs/batch", json={"jobs": []})
    unknown = api_client.post("/v1/jobs/batch", json={"jobs": [GOOD], "atomic": True})

    # then
    assert empty.status_code == unknown.status_code == 422
    assert empty.json()["error"]["details"][0]["field"] == "body.jobs"
    assert unknown.json()["error"]["details"][0]["field"] == "body.atomic"

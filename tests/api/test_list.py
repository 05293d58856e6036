"""GET /v1/jobs: cursor pagination and filters."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import httpx
import pytest

from smallfirst.common.store import JobStore
from tests.api import worker_sim

BANKING = {"task": "banking77_intent", "input": {"text": "Is there a fee for card payments?"}}
EMAIL = {"task": "email_summary", "input": {"text": "Dear team, the invoice is late again. Bob"}}


def all_pages(client: httpx.Client, **params: str | int) -> tuple[list[str], int]:
    """Every job id the listing yields, following cursors; and the number of pages."""
    ids: list[str] = []
    pages = 0
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=query)
        assert page.status_code == 200, page.text
        body = page.json()
        pages += 1
        ids.extend(job["id"] for job in body["data"])
        if not body["has_more"]:
            assert body["next_cursor"] is None
            return ids, pages
        cursor = body["next_cursor"]


@pytest.fixture
def submitted(api_client: httpx.Client) -> list[str]:
    """Seven jobs from one batch: they share their creation millisecond, the hard case for cursors."""
    response = api_client.post("/v1/jobs/batch", json={"jobs": [BANKING] * 7})
    return [result["job"]["id"] for result in response.json()["results"]]


def test_pages_follow_each_other_newest_first_without_gaps_or_repeats(
        api_client: httpx.Client, submitted: list[str]) -> None:
    # when
    ids, pages = all_pages(api_client, limit=3)

    # then
    assert pages == 3
    assert sorted(ids) == sorted(submitted)
    assert len(set(ids)) == len(ids) == 7
    created = [api_client.get(f"/v1/jobs/{i}").json()["created_at"] for i in ids]
    assert created == sorted(created, reverse=True)


def test_filters_by_status_task_and_tier(api_client: httpx.Client, job_store: JobStore,
                                         submitted: list[str]) -> None:
    # given
    worker_sim.succeed(job_store, submitted[0], answer={"label": "card_payment_fee_charged"})
    worker_sim.fail(job_store, submitted[1])
    email_id = api_client.post("/v1/jobs", json=EMAIL).json()["id"]

    # when
    succeeded, _ = all_pages(api_client, status="succeeded", limit=2)
    queued, _ = all_pages(api_client, status="queued", limit=2)
    emails, _ = all_pages(api_client, task="email_summary")
    frontier, _ = all_pages(api_client, tier="frontier")
    small_queued, _ = all_pages(api_client, tier="small", status="queued", task="banking77_intent")

    # then
    assert succeeded == [submitted[0]]
    assert sorted(queued) == sorted([*submitted[2:], email_id])
    assert emails == [email_id]
    assert frontier == [email_id]
    assert sorted(small_queued) == sorted(submitted[2:])


def test_filters_by_creation_time(api_client: httpx.Client, job_store: JobStore) -> None:
    # given: three jobs submitted a little apart
    ids = []
    for _ in range(3):
        ids.append(api_client.post("/v1/jobs", json=BANKING).json()["id"])
        time.sleep(0.02)
    boundary = datetime.fromtimestamp(job_store.get(ids[1]).created_at, tz=UTC).isoformat()

    # when
    after, _ = all_pages(api_client, created_after=boundary, limit=1)
    before, _ = all_pages(api_client, created_before=boundary, limit=1)

    # then: created_after includes the boundary, created_before excludes it
    assert after == [ids[2], ids[1]]
    assert before == [ids[0]]


def _cursor(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize("cursor", [
    "not-a-cursor",
    _cursor('{"s": Infinity, "id": "job_1"}'),
    _cursor('{"s": NaN, "id": "job_1"}'),
    _cursor('{"s": 1e400, "id": "job_1"}'),
    _cursor('{"s": ' + "9" * 5000 + ', "id": "job_1"}'),
    _cursor("[" * 3000),
    _cursor('{"s": {"s": {"s": 1}}, "id": "job_1"}'),
    "%%%%" + "A" * 10,
    "A" * 5000,
])
def test_a_crafted_cursor_is_400_with_its_code(api_client: httpx.Client, cursor: str) -> None:
    # when
    response = api_client.get("/v1/jobs", params={"cursor": cursor})

    # then
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"


def test_bad_limit_and_status_are_422(api_client: httpx.Client) -> None:
    # when
    too_many = api_client.get("/v1/jobs", params={"limit": 1000})
    bad_status = api_client.get("/v1/jobs", params={"status": "done"})

    # then
    assert too_many.status_code == bad_status.status_code == 422
    assert bad_status.json()["error"]["details"][0]["field"] == "query.status"


def test_paging_through_a_large_same_millisecond_batch_while_jobs_arrive(api_client: httpx.Client) -> None:
    # given: 30 jobs created in one millisecond, listed 7 at a time
    batch = api_client.post("/v1/jobs/batch", json={"jobs": [BANKING] * 30}).json()
    batch_ids = {result["job"]["id"] for result in batch["results"]}
    seen: list[str] = []
    cursor = None

    # when: a new job arrives between every two pages
    while True:
        page = api_client.get("/v1/jobs", params={"limit": 7, **({"cursor": cursor} if cursor else {})}).json()
        seen.extend(job["id"] for job in page["data"])
        api_client.post("/v1/jobs", json=BANKING)
        if not page["has_more"]:
            break
        cursor = page["next_cursor"]

    # then: every job of the batch exactly once, and none of the newer ones
    assert len(seen) == len(set(seen)) == 30
    assert set(seen) == batch_ids

"""Per-tenant quotas (429 with Retry-After) and tenant isolation (another tenant's job is 404)."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api_fixtures import TenantFactory

GOOD = {"task": "banking77_intent", "input": {"text": "Can I get a virtual card?"}}


def auth(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(autouse=True)
def fresh_quota_minute() -> None:
    """Quotas count per clock minute: start a test well inside one, so it does not straddle two."""
    into_minute_s = time.time() % 60
    if into_minute_s > 45:
        time.sleep(60 - into_minute_s + 0.1)


def test_submissions_over_the_quota_are_429_with_retry_after(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    limited = tenant_factory("small-customer", quota_jobs_per_minute=3)
    for _ in range(3):
        assert httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(limited.api_key)).status_code == 202

    # when
    response = httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(limited.api_key))

    # then
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.json()["error"]["details"]["limit_jobs_per_minute"] == 3


def test_quota_of_one_tenant_does_not_limit_another(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    limited = tenant_factory("one", quota_jobs_per_minute=1)
    other = tenant_factory("two", quota_jobs_per_minute=1)
    httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(limited.api_key))

    # when
    response = httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(other.api_key))

    # then
    assert response.status_code == 202


def test_batch_counts_each_of_its_jobs_against_the_quota(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    limited = tenant_factory("batcher", quota_jobs_per_minute=5)
    httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(limited.api_key))

    # when: a batch of 6 with 4 jobs left in this minute
    partial = httpx.post(f"{api_server}/v1/jobs/batch", json={"jobs": [GOOD] * 6}, headers=auth(limited.api_key))
    after = httpx.post(f"{api_server}/v1/jobs/batch", json={"jobs": [GOOD]}, headers=auth(limited.api_key))

    # then
    assert partial.status_code == 202
    assert [r["status"] for r in partial.json()["results"]] == [202, 202, 202, 202, 429, 429]
    assert partial.json()["results"][4]["error"]["code"] == "quota_exceeded"
    assert after.status_code == 429
    assert "Retry-After" in after.headers


def test_all_or_nothing_batch_over_the_quota_is_refused_whole(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    limited = tenant_factory("batcher", quota_jobs_per_minute=5)

    # when
    response = httpx.post(f"{api_server}/v1/jobs/batch", json={"jobs": [GOOD] * 6, "all_or_nothing": True},
                          headers=auth(limited.api_key))
    listing = httpx.get(f"{api_server}/v1/jobs", headers=auth(limited.api_key))

    # then
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"
    assert listing.json()["data"] == []


def test_another_tenants_job_is_not_found(api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    owner, intruder = tenant_factory("owner"), tenant_factory("intruder")
    job = httpx.post(f"{api_server}/v1/jobs", json=GOOD, headers=auth(owner.api_key)).json()

    # when
    read = httpx.get(f"{api_server}/v1/jobs/{job['id']}", headers=auth(intruder.api_key))
    long_poll = httpx.get(f"{api_server}/v1/jobs/{job['id']}", params={"wait": 5}, headers=auth(intruder.api_key))
    cancel = httpx.post(f"{api_server}/v1/jobs/{job['id']}/cancel", headers=auth(intruder.api_key))
    listing = httpx.get(f"{api_server}/v1/jobs", headers=auth(intruder.api_key))

    # then
    assert read.status_code == long_poll.status_code == cancel.status_code == 404
    assert read.json()["error"]["code"] == "job_not_found"
    assert listing.json()["data"] == []
    assert httpx.get(f"{api_server}/v1/jobs/{job['id']}", headers=auth(owner.api_key)).json()["status"] == "queued"

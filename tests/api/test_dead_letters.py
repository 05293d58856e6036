"""Dead letters over HTTP: a job that failed for a reason a person can act on is listed with its
reason, and replayed as a new run of the same job, once per entry.

No workers run: the tests end attempts as a worker does (`worker_sim.fail_by_outcome`, the outcome
function and the store's compare-and-set), and count the messages the API publishes in Redis.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Catalog
from smallfirst.common.errors import InfrastructureError, SmallfirstError
from smallfirst.common.runtime import queue_depth as celery_queue_depth
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant
from tests.api import worker_sim
from tests.api_fixtures import TenantFactory

EMAIL = {"task": "email_summary", "input": {"text": "Please call me back about the invoice."}}


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting on `queue`, plus the jobs waiting for it in the tenants' fair lists."""
    return celery_queue_depth(client, queue) + int(client.llen(k.fair_backlog_key(queue)))


def dead_lettered(api_client: httpx.Client, job_store: JobStore, catalog: Catalog,
                  error: SmallfirstError | None = None) -> dict[str, Any]:
    """A frontier-routed job whose attempt failed past its (tiny) deadline, or with `error`."""
    created = api_client.post("/v1/jobs", json={**EMAIL, "deadline_s": 0.001})
    assert created.status_code == 202, created.text
    worker_sim.fail_by_outcome(job_store, catalog, created.json()["id"], error or InfrastructureError("frontier down"))
    job: dict[str, Any] = api_client.get(f"/v1/jobs/{created.json()['id']}").json()
    return job


def test_a_job_failed_past_its_deadline_is_listed_in_its_tenants_dead_letters(
        api_client: httpx.Client, api_server: str, job_store: JobStore, catalog: Catalog,
        tenant_factory: TenantFactory) -> None:
    # given a job whose frontier attempt failed after its deadline passed
    job = dead_lettered(api_client, job_store, catalog)
    assert job["status"] == "failed"
    assert job["dead_letter"] == "deadline_exceeded"

    # when the tenant lists its dead letters
    listed = api_client.get("/v1/dead-letters").json()

    # then the job is there with its reason and the failure's message; another tenant sees nothing
    assert [(e["job_id"], e["reason"]) for e in listed["data"]] == [(job["id"], "deadline_exceeded")]
    assert listed["data"][0]["task"] == "email_summary"
    assert "deadline" in listed["data"][0]["message"]
    other = tenant_factory("globex")
    response = httpx.get(f"{api_server}/v1/dead-letters", headers={"Authorization": f"Bearer {other.api_key}"})
    assert response.json()["data"] == []


def test_a_failure_nobody_can_fix_by_replaying_is_not_a_dead_letter(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog) -> None:
    # given a job that failed because the provider refused the deployment's API key
    job = dead_lettered(api_client, job_store, catalog, SmallfirstError("401", code="frontier_auth_failed"))

    # when / then it is failed, not dead-lettered, and a replay is refused
    assert job["status"] == "failed"
    assert job["dead_letter"] is None
    assert api_client.get("/v1/dead-letters").json()["data"] == []
    response = api_client.post(f"/v1/jobs/{job['id']}/replay")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_not_dead_lettered"


def test_a_replay_is_a_new_run_of_the_same_job_and_a_repeat_starts_nothing(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog, redis_url: str) -> None:
    # given a dead-lettered job (its first message was published when it was submitted)
    job = dead_lettered(api_client, job_store, catalog)
    client = redis.Redis.from_url(redis_url)
    published_before = queue_depth(client, k.QUEUE_FRONTIER)

    # when it is replayed, and the replay is sent again
    first = api_client.post(f"/v1/jobs/{job['id']}/replay", json={"deadline_s": 120})
    again = api_client.post(f"/v1/jobs/{job['id']}/replay", json={"deadline_s": 120})

    # then the first makes a new run of the same job, with its history and a fresh deadline
    assert first.status_code == 202, first.text
    replayed = first.json()
    assert replayed["id"] == job["id"]
    assert replayed["status"] == "queued"
    assert replayed["replays"] == 1
    assert replayed["attempts"] == job["attempts"]
    assert replayed["deadline_at"] == pytest.approx(replayed["replayed_at"] + 120)
    # and the repeat answers the job as it is: no second run, one message published for the replay
    assert again.status_code == 200
    assert again.json()["replays"] == 1
    assert queue_depth(client, k.QUEUE_FRONTIER) == published_before + 1
    # and the entry left the dead letters
    assert api_client.get("/v1/dead-letters").json()["data"] == []


def test_a_replayed_job_that_succeeds_counts_as_ended_once_in_the_stats(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog) -> None:
    # given a dead-lettered job, replayed
    job = dead_lettered(api_client, job_store, catalog)
    api_client.post(f"/v1/jobs/{job['id']}/replay")

    # when its new run succeeds on the frontier
    worker_sim.succeed(job_store, job["id"], tier=worker_sim.Tier.FRONTIER, answer={"summary": "call back"},
                       cost_usd=0.002)

    # then the task's figures count one job, ended once, succeeded, billed for that run only
    stats = api_client.get("/v1/stats", params={"task": "email_summary"}).json()["tasks"][0]
    assert stats["jobs_ended"] == 1
    assert stats["by_status"]["succeeded"] == 1
    assert stats["by_status"]["failed"] == 0
    assert stats["cost_usd"] == pytest.approx(0.002)
    assert api_client.get(f"/v1/jobs/{job['id']}").json()["cost_usd"] == pytest.approx(0.002)


def test_dead_letters_filter_by_reason_and_time_and_page_with_a_cursor(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog) -> None:
    # given three deadline failures and one refused request, in that order
    deadline = [dead_lettered(api_client, job_store, catalog)["id"] for _ in range(3)]
    middle = time.time()
    refused = dead_lettered(api_client, job_store, catalog, SmallfirstError("400", code="frontier_rejected"))

    # when the tenant pages through deadline failures two at a time
    first = api_client.get("/v1/dead-letters", params={"reason": "deadline_exceeded", "limit": 2}).json()
    second = api_client.get("/v1/dead-letters", params={"reason": "deadline_exceeded", "limit": 2,
                                                        "cursor": first["next_cursor"]}).json()

    # then it sees each of them once, newest first
    assert [e["job_id"] for e in first["data"] + second["data"]] == list(reversed(deadline))
    assert first["has_more"] is True
    assert second["has_more"] is False
    # and a time range keeps only what failed in it
    later = api_client.get("/v1/dead-letters", params={"failed_after": middle}).json()
    assert [e["job_id"] for e in later["data"]] == [refused["id"]]
    assert later["data"][0]["reason"] == "frontier_rejected"


def test_bulk_replay_replays_the_entries_of_one_reason_only(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog, tenant: IssuedTenant) -> None:
    # given two deadline failures and one refused request
    deadline = {dead_lettered(api_client, job_store, catalog)["id"] for _ in range(2)}
    refused = dead_lettered(api_client, job_store, catalog, SmallfirstError("400", code="frontier_rejected"))

    # when the deadline failures are replayed in bulk
    response = api_client.post("/v1/dead-letters/replay", json={"reason": "deadline_exceeded"})

    # then both are queued again and the refused request stays in the dead letters
    assert response.status_code == 200, response.text
    assert set(response.json()["replayed"]) == deadline
    assert response.json()["has_more"] is False
    for job_id in deadline:
        assert api_client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert [e["job_id"] for e in api_client.get("/v1/dead-letters").json()["data"]] == [refused["id"]]


def test_the_cli_lists_and_replays_dead_letters_by_reason(
        api_client: httpx.Client, api_server: str, job_store: JobStore, catalog: Catalog,
        tenant: IssuedTenant) -> None:
    # given two deadline failures
    deadline = {dead_lettered(api_client, job_store, catalog)["id"] for _ in range(2)}
    env = {**os.environ, "SMALLFIRST_API_URL": api_server, "SMALLFIRST_API_KEY": tenant.api_key}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "smallfirst.cli", "dead-letters", *args], env=env,
                              capture_output=True, text=True, timeout=60, check=False)

    # when the operator lists them and replays them by reason from a shell
    listed = cli("list", "--reason", "deadline_exceeded", "--limit", "1", "--all")
    replayed = cli("replay", "--reason", "deadline_exceeded", "--deadline-s", "60")

    # then the list showed both (one page at a time), the replay named both, and none is left
    assert listed.returncode == 0, listed.stderr
    assert {json.loads(line)["job_id"] for line in listed.stdout.splitlines()} == deadline
    assert replayed.returncode == 0, replayed.stderr
    assert set(replayed.stdout.split()) == deadline
    assert cli("list").stdout == ""
    # and replaying a job that is not a dead letter is the API's error, on stderr
    refused = cli("replay", "job_does_not_exist")
    assert refused.returncode != 0
    assert "job_not_found" in refused.stderr


def test_a_replayed_jobs_next_end_is_a_new_callback_with_tries_of_its_own(
        api_client: httpx.Client, job_store: JobStore, catalog: Catalog, redis_url: str) -> None:
    # given a dead-lettered job whose failure's callback was already tried
    job = dead_lettered(api_client, job_store, catalog)
    client = redis.Redis.from_url(redis_url)
    client.hset(k.webhook_delivery_key(job["id"]), mapping={"tries": 8, "last_status": 500})

    # when it is replayed
    assert api_client.post(f"/v1/jobs/{job['id']}/replay").status_code == 202

    # then the delivery record of the earlier end is gone, so the next end is delivered afresh
    assert client.exists(k.webhook_delivery_key(job["id"])) == 0

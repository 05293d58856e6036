"""GET /v1/stats after jobs end the ways workers end them."""

from __future__ import annotations

import httpx
import pytest

from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from tests.api import worker_sim
from tests.api_fixtures import TenantFactory

BANKING = {"task": "banking77_intent", "input": {"text": "My transfer has not arrived."}}
EMAIL = {"task": "email_summary", "input": {"text": "Hello, can we move our call to Tuesday? Kim"}}


def test_stats_count_jobs_tiers_escalations_cost_and_savings(api_client: httpx.Client, job_store: JobStore) -> None:
    # given: four banking jobs that end four different ways, and an email job still queued
    answered, escalated, failed, cancelled = (api_client.post("/v1/jobs", json=BANKING).json()["id"]
                                              for _ in range(4))
    api_client.post("/v1/jobs", json=EMAIL)
    worker_sim.succeed(job_store, answered, answer={"label": "transfer_not_received_by_recipient"},
                       cost_usd=0.0001, estimated_frontier_cost_usd=0.002)
    worker_sim.escalate(job_store, escalated, reasons=["min_confidence: 0.21 < 0.40"], small_cost_usd=0.00005)
    worker_sim.succeed(job_store, escalated, tier=Tier.FRONTIER, answer={"label": "transfer_timing"}, cost_usd=0.003)
    worker_sim.fail(job_store, failed, code="validation_failed")
    api_client.post(f"/v1/jobs/{cancelled}/cancel")

    # when
    stats = api_client.get("/v1/stats").json()

    # then
    by_task = {entry["task"]: entry for entry in stats["tasks"]}
    banking = by_task["banking77_intent"]
    assert banking["jobs_submitted"] == 4
    assert banking["jobs_ended"] == 4
    assert banking["jobs_in_progress"] == 0
    assert banking["by_status"] == {"cancelled": 1, "failed": 1, "succeeded": 2}
    assert banking["routed"] == {"small": 4, "frontier": 0}
    assert banking["served"] == {"small": 1, "frontier": 1}
    assert banking["escalated"] == 1
    assert banking["escalation_rate"] == 0.5
    assert banking["escalation_reasons"] == {"min_confidence": 1}
    assert banking["errors"] == {"validation_failed": 1}
    assert banking["cost_usd"] == pytest.approx(0.00315)
    assert banking["cost_usd_by_tier"] == pytest.approx({"small": 0.00015, "frontier": 0.003})
    assert banking["estimated_frontier_cost_usd"] == pytest.approx(0.002)
    assert banking["savings_usd"] == pytest.approx(0.0019)
    assert (banking["input_tokens"], banking["output_tokens"]) == (30, 6)
    email = by_task["email_summary"]
    assert (email["jobs_submitted"], email["jobs_in_progress"], email["routed"]["frontier"]) == (1, 1, 1)
    assert stats["totals"]["task"] == "*"
    assert stats["totals"]["jobs_submitted"] == 5
    assert stats["totals"]["cost_usd"] == pytest.approx(0.00315)


def test_stats_of_one_task_and_of_an_unknown_task(api_client: httpx.Client) -> None:
    # given
    api_client.post("/v1/jobs", json=BANKING)
    api_client.post("/v1/jobs", json=EMAIL)

    # when
    one = api_client.get("/v1/stats", params={"task": "email_summary"}).json()
    unknown = api_client.get("/v1/stats", params={"task": "nope"})

    # then
    assert [entry["task"] for entry in one["tasks"]] == ["email_summary"]
    assert one["totals"]["jobs_submitted"] == 1
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_task"


def test_stats_are_per_tenant(api_client: httpx.Client, api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    api_client.post("/v1/jobs", json=BANKING)
    other = tenant_factory("other")

    # when
    stats = httpx.get(f"{api_server}/v1/stats", headers={"Authorization": f"Bearer {other.api_key}"}).json()

    # then
    assert stats["tenant"] == other.tenant.id
    assert stats["tasks"] == []
    assert stats["totals"]["jobs_submitted"] == 0

"""Frontier spend budgets at the API: shown in /v1/stats, and applied when a job is routed."""

from __future__ import annotations

import httpx
import pytest

from smallfirst.common.budgets import CODE_BUDGET_EXCEEDED
from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from tests.api import worker_sim
from tests.api_fixtures import TenantFactory

BANKING = {"task": "banking77_intent", "input": {"text": "My transfer has not arrived."}}
EMAIL = {"task": "email_summary", "input": {"text": "Hello, can we move our call to Tuesday? Kim"}}


def client_for(api_server: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {api_key}"}, timeout=10)


@pytest.mark.parametrize(("policy", "frontier_status", "small_status"),
                         [("small_only", 402, 202), ("hold", 202, 202), ("fail", 402, 402)])
def test_past_its_budget_a_tenants_submissions_follow_its_policy(
        api_server: str, tenant_factory: TenantFactory, job_store: JobStore, policy: str, frontier_status: int,
        small_status: int) -> None:
    # given a tenant with a daily frontier budget of 0.01 USD that an escalation's answer overspent
    issued = tenant_factory("spender", limits={"budget_daily_usd": 0.01, "budget_monthly_usd": 1.0,
                                               "budget_policy": policy})
    with client_for(api_server, issued.api_key) as api:
        job_id = api.post("/v1/jobs", json=BANKING).json()["id"]
        worker_sim.escalate(job_store, job_id, reasons=["min_confidence: 0.2 < 0.4"])
        worker_sim.succeed(job_store, job_id, tier=Tier.FRONTIER, answer={"label": "x"}, cost_usd=0.012)

        # when it asks for its stats and submits a frontier-routed job and a small one
        stats = api.get("/v1/stats").json()
        frontier = api.post("/v1/jobs", json=EMAIL)
        small = api.post("/v1/jobs", json=BANKING)
        frontier_batch = api.post("/v1/jobs/batch", json={"jobs": [EMAIL, EMAIL]})

    # then the stats show the spend against both budgets
    budget = stats["budget"]
    assert (budget["policy"], budget["status"]) == (policy, "exceeded")
    assert budget["day"]["spent_usd"] == pytest.approx(0.012)
    assert budget["day"]["limit_usd"] == 0.01
    assert budget["month"]["used_ratio"] == pytest.approx(0.012)
    assert stats["totals"]["cost_usd_by_tier"]["frontier"] == pytest.approx(budget["day"]["spent_usd"])
    # and the submissions follow the policy, refused ones with budget_exceeded and a Retry-After
    assert (frontier.status_code, small.status_code) == (frontier_status, small_status)
    assert frontier_batch.status_code == frontier_status
    for response in (frontier, small, frontier_batch):
        if response.status_code == 402:
            assert response.json()["error"]["code"] == CODE_BUDGET_EXCEEDED
            assert int(response.headers["Retry-After"]) >= 1


def test_a_tenant_under_its_budget_sees_its_spend_and_submits_as_usual(
        api_server: str, tenant_factory: TenantFactory, job_store: JobStore) -> None:
    # given a tenant that spent 85 % of its daily budget
    issued = tenant_factory("careful", limits={"budget_daily_usd": 0.01})
    with client_for(api_server, issued.api_key) as api:
        job_id = api.post("/v1/jobs", json=EMAIL).json()["id"]
        worker_sim.succeed(job_store, job_id, tier=Tier.FRONTIER, answer="summary", cost_usd=0.0085)

        # when it reads its stats and submits another frontier job
        budget = api.get("/v1/stats").json()["budget"]
        response = api.post("/v1/jobs", json=EMAIL)

    # then it is warned, not refused
    assert budget["status"] == "warning"
    assert budget["month"]["limit_usd"] is None
    assert response.status_code == 202

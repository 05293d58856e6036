"""Jobs through the whole stack: API (uvicorn), Redis, both worker pools, the inference services
running real vLLM, and the frontier simulator, each a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from smallfirst.cli.stack import Stack
from smallfirst.common import constants as k
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from smallfirst.common.webhooks import verify_headers
from tests.e2e.conftest import (
    INVOICE_ANSWER,
    INVOICE_TEXT,
    WebhookReceiver,
    dump,
    sim_requests,
    submit_and_wait,
    wait_for_end,
    wait_for_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]


def billed_attempts(job: dict, tier: str) -> list[dict]:
    return [a for a in job["attempts"] if a["tier"] == tier and a["billed"]]


def test_classify_job_is_answered_by_the_small_tier(client: httpx.Client, frontier_sim: httpx.Client) -> None:
    # given: a support message of a kind the Banking77 task knows well
    frontier_calls_before = sim_requests(frontier_sim)
    # when
    job = submit_and_wait(client, {"task": "banking77_intent", "input": {"text": "I am still waiting on my card?"}})
    # then: the small tier answered, confidently, and the frontier was never called
    assert job["status"] == "succeeded", dump(job)
    assert job["route"] == {"tier": "small", "reason": "task_default", "detail": "task default: small",
                            "frontier_mode": "realtime", "frontier_mode_source": "task"}
    assert job["result"] == {"label": "card_arrival"}
    [attempt] = job["attempts"]
    assert attempt["tier"] == "small"
    assert attempt["model"] == "all-minilm-l6-v2"
    assert attempt["verdict"]["passed"]
    assert attempt["confidence"] >= 0.5
    assert attempt["cost_usd"] == 0
    assert attempt["estimated_frontier_cost_usd"] > 0
    assert sim_requests(frontier_sim) == frontier_calls_before


def test_extract_job_failing_small_validation_is_escalated_to_frontier(client: httpx.Client) -> None:
    # given: an invoice; the tiny random-weight generator cannot produce valid, grounded fields
    # when
    job = submit_and_wait(client, {"task": "invoice_fields", "input": {"text": INVOICE_TEXT}})
    # then: the small answer was rejected with reasons, and the frontier's answer is the result
    assert job["status"] == "succeeded", dump(job)
    small, frontier = job["attempts"]
    assert small["tier"] == "small"
    assert small["outcome"] == "rejected"
    assert small["verdict"]["passed"] is False
    assert small["verdict"]["reasons"]
    assert job["escalation_reasons"] == small["verdict"]["reasons"]
    assert frontier["tier"] == "frontier"
    assert frontier["outcome"] == "accepted"
    assert frontier["model"] == "claude-haiku-5-5"
    assert frontier["billed"]
    assert frontier["cost_usd"] > 0
    assert frontier["usage"]["input_tokens"] > 0
    assert job["result"] == INVOICE_ANSWER
    assert job["cost_usd"] == pytest.approx(frontier["cost_usd"])


def test_local_only_job_failing_validation_is_not_escalated(client: httpx.Client, frontier_sim: httpx.Client) -> None:
    # given
    frontier_calls_before = sim_requests(frontier_sim)
    # when: the same invoice, but the job must stay on the self-hosted tier
    job = submit_and_wait(client, {"task": "invoice_fields", "input": {"text": INVOICE_TEXT}, "local_only": True})
    # then: it fails with the validation reasons, and nothing went to the frontier
    assert job["status"] == "failed", dump(job)
    assert job["error"]["code"] == "validation_failed"
    assert job["error"]["details"]["reasons"]
    assert [a["tier"] for a in job["attempts"]] == ["small"]
    assert sim_requests(frontier_sim) == frontier_calls_before


def test_frontier_hint_on_local_only_job_is_refused(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json={"task": "invoice_fields", "input": {"text": INVOICE_TEXT},
                                             "local_only": True, "tier": "frontier"})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "local_only_conflict"


def test_cancel_while_frontier_call_in_flight_keeps_job_cancelled(client: httpx.Client,
                                                                   frontier_sim: httpx.Client) -> None:
    # given: the frontier answers slowly, and a summary job (routed to frontier) is running
    frontier_sim.post("/_sim/faults", json={"faults": [{"kind": "slow", "delay_ms": 3000}]})
    created = client.post("/v1/jobs", json={"task": "email_summary", "input": {"text": "Please call me back."}})
    job_id = created.json()["id"]
    wait_for_status(client, job_id, "running")
    # when
    cancelled = client.post(f"/v1/jobs/{job_id}/cancel")
    # then: cancelled at once, and the late frontier answer does not overwrite it
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    time.sleep(4)
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled", dump(job)
    assert job["result"] is None
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 409


def test_idempotent_replay_and_tenant_isolation(stack: Stack, client: httpx.Client,
                                                tenants: TenantRegistry) -> None:
    # given
    body = {"task": "banking77_intent", "input": {"text": "Where is my card?"}}
    headers = {k.HEADER_IDEMPOTENCY_KEY: f"order-{time.monotonic_ns()}"}
    # when: the same request twice with the same key
    first = client.post("/v1/jobs", json=body, headers=headers)
    second = client.post("/v1/jobs", json=body, headers=headers)
    # then: one job
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    # and another tenant cannot see it
    other = tenants.create("other-tenant")
    response = httpx.get(f"{stack.api_url}/v1/jobs/{first.json()['id']}",
                         headers={"Authorization": f"Bearer {other.api_key}"})
    assert response.status_code == 404
    assert wait_for_end(client, first.json()["id"])["status"] == "succeeded"


def test_webhook_delivered_with_verifiable_signature_after_a_failed_try(
        client: httpx.Client, tenant: IssuedTenant, webhook_receiver: WebhookReceiver) -> None:
    # given: a receiver that refuses the first delivery
    webhook_receiver.fail_first = 1
    # when
    job = submit_and_wait(client, {"task": "banking77_intent", "input": {"text": "I am still waiting on my card?"},
                                   "callback_url": webhook_receiver.url})
    # then: the retry arrives, signed with the tenant's secret
    [callback] = webhook_receiver.wait(1, timeout_s=60)
    verify_headers(tenant.tenant.webhook_secret, callback.headers, callback.body)
    payload = httpx.Response(200, content=callback.body).json()
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"]
    assert payload["data"]["result"] == {"label": "card_arrival"}


def test_worker_killed_mid_job_still_succeeds_with_one_billed_attempt_per_tier(
        stack: Stack, client: httpx.Client, frontier_sim: httpx.Client) -> None:
    # given: an escalated job whose frontier call is slow
    frontier_sim.post("/_sim/faults", json={"faults": [{"kind": "slow", "delay_ms": 4000}]})
    job_id = client.post("/v1/jobs", json={"task": "invoice_fields", "input": {"text": INVOICE_TEXT}}).json()["id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["attempts"][-1]["tier"] == "frontier":
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the job never reached its frontier attempt: {job}")
    # when: the frontier worker is killed (SIGKILL) in the middle of the call, then comes back
    stack[f"worker-{k.POOL_FRONTIER}"].kill()
    stack.start_worker(k.POOL_FRONTIER)
    # then: the job still succeeds, with one result and one billed attempt per tier
    job = wait_for_end(client, job_id, wait_s=60)
    assert job["status"] == "succeeded", dump(job)
    assert job["result"] == INVOICE_ANSWER
    assert len(billed_attempts(job, "small")) == 1
    assert len(billed_attempts(job, "frontier")) == 1
    abandoned = [a for a in job["attempts"] if a["outcome"] == "abandoned"]
    assert len(abandoned) == 1
    assert abandoned[0]["tier"] == "frontier"
    assert not abandoned[0]["billed"]
    assert abandoned[0]["error"]["code"] == "worker_lost"


def test_cli_submit_waits_for_the_result(stack: Stack, tenant: IssuedTenant) -> None:
    # when: a job submitted from the shell with --wait
    out = subprocess.run(
        [sys.executable, "-m", "smallfirst.cli", "submit", "--api-url", stack.api_url, "--task", "banking77_intent",
         "--text", "I am still waiting on my card?", "--wait", "60"],
        env={**os.environ, "SMALLFIRST_API_KEY": tenant.api_key}, capture_output=True, text=True, timeout=120,
        check=False)
    # then: it prints the ended job
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    assert job["status"] == "succeeded"
    assert job["result"] == {"label": "card_arrival"}
    # and an unknown task is a clear error with the API's code
    bad = subprocess.run([sys.executable, "-m", "smallfirst.cli", "submit", "--api-url", stack.api_url, "--task",
                          "nope", "--text", "x"], env={**os.environ, "SMALLFIRST_API_KEY": tenant.api_key},
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0
    assert "unknown_task" in bad.stderr


def test_frontier_outage_longer_than_an_attempt_is_retried_until_it_answers_billed_once(
        client: httpx.Client, frontier_sim: httpx.Client) -> None:
    # given: the frontier overloads on more calls than one attempt may make (6), then recovers
    outage = [{"kind": "529", "retry_after_s": 0.05} for _ in range(8)]
    frontier_sim.post("/_sim/faults", json={"faults": outage})

    # when a frontier-routed job is submitted within a deadline that leaves room for a retry
    job = submit_and_wait(client, {"task": "email_summary", "input": {"text": "Please call me back today."},
                                   "deadline_s": 300}, wait_s=60)

    # then the first attempt ended unanswered and unbilled, a later one succeeded, billed once
    assert job["status"] == "succeeded", dump(job)
    retried = [a for a in job["attempts"] if a["outcome"] == "retried"]
    assert len(retried) == 1, dump(job)
    assert retried[0]["error"]["code"] == "frontier_unavailable"
    assert not retried[0]["billed"]
    assert len(billed_attempts(job, "frontier")) == 1
    assert job["cost_usd"] == pytest.approx(billed_attempts(job, "frontier")[0]["cost_usd"])


def test_a_job_failed_by_a_frontier_outage_past_its_deadline_is_a_dead_letter_and_a_replay_after_it_succeeds(
        client: httpx.Client, frontier_sim: httpx.Client) -> None:
    # given: the frontier is overloaded for far more calls than the job's short deadline allows
    frontier_sim.post("/_sim/faults", json={"faults": [{"kind": "529", "retry_after_s": 0.05, "count": 1000}]})

    # when a frontier-routed job with a deadline of two seconds is submitted
    job = submit_and_wait(client, {"task": "email_summary", "input": {"text": "Please call me back today."},
                                   "deadline_s": 2}, wait_s=60)

    # then it failed past its deadline into the tenant's dead letters, nothing billed
    assert job["status"] == "failed", dump(job)
    assert job["error"]["code"] == "deadline_exceeded"
    assert job["dead_letter"] == "deadline_exceeded"
    assert billed_attempts(job, "frontier") == []
    entries = client.get("/v1/dead-letters", params={"reason": "deadline_exceeded"}).json()["data"]
    assert [e["job_id"] for e in entries] == [job["id"]]

    # when the outage is over and the job is replayed
    frontier_sim.delete("/_sim/faults")
    replay = client.post(f"/v1/jobs/{job['id']}/replay", json={"deadline_s": 120})
    assert replay.status_code == 202, replay.text
    done = wait_for_end(client, job["id"], wait_s=60)

    # then the same job succeeded, its failed attempts kept, billed once for the successful attempt
    assert done["status"] == "succeeded", dump(done)
    assert done["replays"] == 1
    assert done["attempts"][:len(job["attempts"])] == job["attempts"]
    billed = billed_attempts(done, "frontier")
    assert len(billed) == 1
    assert billed[0]["outcome"] == "accepted"
    assert done["cost_usd"] == pytest.approx(billed[0]["cost_usd"])
    assert done["cost_usd"] > 0
    # and it left the dead letters
    assert client.get("/v1/dead-letters").json()["data"] == []

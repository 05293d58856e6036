"""The services wired for observability, run as their real processes: the API, a small-tier worker
and a frontier-tier worker (the `smallfirst` commands), exporting traces to a real OTLP receiver and
serving /metrics, with the frontier simulator as the provider.

No vLLM: the small worker's inference target is a port nobody listens on, so its attempt fails with
`unavailable` and the job is escalated, which is the path that crosses every service.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from smallfirst.common import constants as k
from smallfirst.common.tenants import IssuedTenant
from tests.frontier_fixtures import SimControl
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.procs import ManagedProcess, free_port, require_binary

TASK = "banking77_intent"
SMALL_MODEL = "all-minilm-l6-v2"
FRONTIER_MODEL = "claude-haiku-5-5"


@dataclass
class Services:
    api_url: str
    api: ManagedProcess
    small_worker: ManagedProcess
    small_metrics_url: str
    frontier_worker: ManagedProcess
    frontier_metrics_url: str


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def running_services(redis_url: str, catalog_path: Path, logs_dir: Path, tmp_path: Path, otlp_receiver: OtlpReceiver,
                     frontier_sim: SimControl, inference_targets: dict[str, str]) -> Iterator[Services]:
    """API and both worker pools, tracing to `otlp_receiver`, each pool serving metrics on its own port."""
    env = {
        **otlp_receiver.env(),
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(catalog_path),
        "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"),
        "SMALLFIRST_INFERENCE_TARGETS": json.dumps(inference_targets),
        "SMALLFIRST_FRONTIER_SIM_URL": frontier_sim.url,
        "SMALLFIRST_FRONTIER_BASE_URL": frontier_sim.url,
        "SMALLFIRST_LOG_LEVEL": "INFO",
    }
    cli = [sys.executable, "-m", "smallfirst.cli"]
    api_port, small_port, frontier_port = free_port(), free_port(), free_port()
    api = ManagedProcess(f"obs-api-{api_port}", [*cli, "api", "--host", "127.0.0.1", "--port", str(api_port)],
                         logs_dir, env=env)
    small = ManagedProcess(f"obs-small-worker-{small_port}",
                           [*cli, "worker", "--pool", k.POOL_SMALL, "--concurrency", "2", "--hostname", "obs-small@%h"],
                           logs_dir, env={**env, "SMALLFIRST_METRICS_PORT": str(small_port)})
    frontier = ManagedProcess(f"obs-frontier-worker-{frontier_port}",
                              [*cli, "worker", "--pool", k.POOL_FRONTIER, "--concurrency", "2", "--hostname",
                               "obs-frontier@%h"],
                              logs_dir, env={**env, "SMALLFIRST_METRICS_PORT": str(frontier_port)})
    processes = [api, small, frontier]
    services = Services(f"http://127.0.0.1:{api_port}", api, small, f"http://127.0.0.1:{small_port}/metrics",
                        frontier, f"http://127.0.0.1:{frontier_port}/metrics")
    try:
        for process in processes:
            process.start()
        api.wait_ready(lambda: _answers(f"{services.api_url}/readyz"))
        heartbeats = tmp_path / "heartbeats"
        small.wait_ready(lambda: (heartbeats / f"smallfirst-worker-{k.POOL_SMALL}.heartbeat").exists()
                         and _answers(services.small_metrics_url), timeout_s=90)
        frontier.wait_ready(lambda: (heartbeats / f"smallfirst-worker-{k.POOL_FRONTIER}.heartbeat").exists()
                            and _answers(services.frontier_metrics_url), timeout_s=90)
        yield services
    finally:
        for process in processes:
            process.stop()




@pytest.fixture
def traced_services(redis_url: str, catalog_path: Path, logs_dir: Path, tmp_path: Path,
                    otlp_receiver: OtlpReceiver, frontier_sim: SimControl) -> Iterator[Services]:
    # Nothing listens there: every small-tier call fails with UNAVAILABLE.
    with running_services(redis_url, catalog_path, logs_dir, tmp_path, otlp_receiver, frontier_sim,
                          {SMALL_MODEL: f"127.0.0.1:{free_port()}"}) as services:
        yield services


def promtool_check(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), "check", "metrics"], input=exposition, capture_output=True,
                          text=True, timeout=30, check=False)


def metric(url: str, name: str, **labels: str) -> float:
    """One sample from a /metrics page (0 when absent), labels matched whatever their order."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url, timeout=5).text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(key) == value for key, value in labels.items()):
                return float(found.value)
    return 0.0


def json_lines(process: ManagedProcess) -> list[dict[str, Any]]:
    lines = []
    for line in process.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


def test_escalated_job_is_one_trace_across_api_and_both_pools_and_counted_by_each(
        traced_services: Services, tenant: IssuedTenant, otlp_receiver: OtlpReceiver) -> None:
    # given the API and both pools, tracing and serving metrics
    headers = {"Authorization": f"Bearer {tenant.api_key}"}

    # when a small-tier job is submitted and waited for
    with httpx.Client(base_url=traced_services.api_url, headers=headers, timeout=90) as client:
        submitted = client.post("/v1/jobs", json={"task": TASK, "input": {"text": "Where is my new card?"}})
        assert submitted.status_code == 202, submitted.text
        job_id, trace_id = submitted.json()["id"], submitted.json()["trace_id"]
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()

    # then the small tier could not answer it, and the frontier tier did
    assert job["status"] == "succeeded", job
    assert [(a["tier"], a["outcome"]) for a in job["attempts"]] == [("small", "error"), ("frontier", "accepted")]
    assert "traceparent" not in job
    assert len(trace_id) == 32

    # and every hop is a span of the one trace the API started, each under the right parent
    def complete(spans: list[ReceivedSpan]) -> bool:
        names = {s.name for s in spans if s.trace_id == trace_id}
        return {k.SPAN_VALIDATE, "anthropic.messages.create", f"run/{k.TASK_RUN_FRONTIER}"} <= names and sum(
            s.name == k.SPAN_JOB_ATTEMPT and s.trace_id == trace_id for s in spans) == 2

    received = otlp_receiver.wait_for(complete, timeout_s=60, what="the job's trace")
    spans = [s for s in received if s.trace_id == trace_id]

    def one(name: str, service: str, **attributes: Any) -> ReceivedSpan:
        found = [s for s in spans if s.name == name and s.service_name == service
                 and all(s.attributes.get(key) == value for key, value in attributes.items())]
        assert len(found) == 1, f"{service}:{name} {attributes}: {found}"
        return found[0]

    def children(parent: ReceivedSpan) -> list[ReceivedSpan]:
        return [s for s in spans if s.parent_span_id == parent.span_id]

    request = one("POST /v1/jobs", k.SERVICE_API)
    submit = one(k.SPAN_JOB_SUBMIT, k.SERVICE_API)
    run_small = one(f"run/{k.TASK_RUN_SMALL}", k.SERVICE_SMALL_WORKER)
    small_attempt = one(k.SPAN_JOB_ATTEMPT, k.SERVICE_SMALL_WORKER)
    publish_escalation = one(f"apply_async/{k.TASK_RUN_FRONTIER}", k.SERVICE_SMALL_WORKER)
    run_frontier = one(f"run/{k.TASK_RUN_FRONTIER}", k.SERVICE_FRONTIER_WORKER)
    frontier_attempt = one(k.SPAN_JOB_ATTEMPT, k.SERVICE_FRONTIER_WORKER)
    frontier_call = one(k.SPAN_FRONTIER_CALL, k.SERVICE_FRONTIER_WORKER)
    validate = one(k.SPAN_VALIDATE, k.SERVICE_FRONTIER_WORKER)
    sdk_calls = [s for s in spans if s.name == "anthropic.messages.create"]

    assert submit.parent_span_id == request.span_id
    # put in its tenant's fair list by the API's publisher thread, in bulk: no span per message; the
    # small pool's fair dispatcher publishes it, its producer span continuing the submit span
    dispatch = one(f"apply_async/{k.TASK_RUN_SMALL}", k.SERVICE_SMALL_WORKER)
    assert dispatch.parent_span_id == submit.span_id
    assert run_small.parent_span_id == dispatch.span_id
    assert not [s for s in spans if s.service_name == k.SERVICE_API and s.kind == "SPAN_KIND_PRODUCER"]
    assert small_attempt.parent_span_id == run_small.span_id
    assert publish_escalation.parent_span_id == small_attempt.span_id
    assert run_frontier.parent_span_id == publish_escalation.span_id
    assert frontier_attempt.parent_span_id == run_frontier.span_id
    assert frontier_call.parent_span_id == frontier_attempt.span_id
    assert validate.parent_span_id == frontier_attempt.span_id
    assert [s.parent_span_id for s in sdk_calls] == [frontier_call.span_id]
    assert any(s.name.endswith("/GetModelInfo") and s.kind == "SPAN_KIND_CLIENT"
               for s in children(small_attempt)), "the gRPC client calls are not traced"
    assert any(s.attributes.get("db.system") == "redis" for s in children(small_attempt))
    assert submit.attributes[k.ATTR_JOB_ID] == job_id
    assert small_attempt.attributes[k.ATTR_JOB_STATUS] == "escalated"
    assert small_attempt.attributes[k.ATTR_ESCALATION_REASON] == ["small_tier_error"]
    assert frontier_attempt.attributes[k.ATTR_JOB_STATUS] == "succeeded"
    assert frontier_attempt.attributes[k.ATTR_TENANT] == tenant.tenant.id
    assert frontier_call.attributes[k.ATTR_GEN_AI_REQUEST_MODEL] == FRONTIER_MODEL
    assert frontier_call.attributes[k.ATTR_GEN_AI_INPUT_TOKENS] > 0
    assert validate.attributes[k.ATTR_VERDICT] is True

    # and each pool counted its part, in expositions promtool accepts
    small_metrics, frontier_metrics = traced_services.small_metrics_url, traced_services.frontier_metrics_url
    assert metric(small_metrics, "smallfirst_escalations_total", task=TASK, reason="small_tier_error") == 1
    assert metric(small_metrics, "smallfirst_job_duration_seconds_count", tier="small", phase="queue_wait") == 1
    assert metric(frontier_metrics, "smallfirst_jobs_ended_total", task=TASK, tier="frontier",
                  status="succeeded") == 1
    assert metric(frontier_metrics, "smallfirst_frontier_requests_total", model=FRONTIER_MODEL, outcome="ok") == 1
    assert metric(frontier_metrics, "smallfirst_frontier_tokens_total", model=FRONTIER_MODEL, direction="input") > 0
    assert metric(f"{traced_services.api_url}/metrics", "smallfirst_jobs_submitted_total", task=TASK,
                  tier="small") == 1
    for url in (small_metrics, frontier_metrics):
        result = promtool_check(httpx.get(url, timeout=5).text)
        assert result.returncode == 0, f"{url}: {result.stdout}{result.stderr}"

    # and the small worker's JSON log lines about the job carry its id and its trace
    about_job = [line for line in json_lines(traced_services.small_worker) if line.get("job_id") == job_id]
    assert about_job, "no log line of the small worker names the job"
    assert {line["trace_id"] for line in about_job} == {trace_id}
    assert {line["service"] for line in about_job} == {k.SERVICE_SMALL_WORKER}
    assert json_lines(traced_services.api), "the API does not log JSON lines"
    assert otlp_receiver.rejected == []


INVOICE = ("Invoice number: INV-77\nVendor: Fjord Supplies AS\nCurrency: NOK\nTotal amount: 8,400.00\n"
           "Due date: 2026-12-24")


@pytest.mark.vllm
def test_escalated_job_trace_includes_the_inference_service(
        redis_url: str, catalog_path: Path, logs_dir: Path, tmp_path: Path, otlp_receiver: OtlpReceiver,
        frontier_sim: SimControl, tenant: IssuedTenant, monkeypatch: pytest.MonkeyPatch,
        start_inference_server: Any) -> None:
    # given: a real inference server (vLLM, the tiny generator) that traces too, and the services
    for name, value in otlp_receiver.env().items():
        monkeypatch.setenv(name, value)
    generator = start_inference_server("generate")
    monkeypatch.undo()
    with running_services(redis_url, catalog_path, logs_dir, tmp_path, otlp_receiver, frontier_sim,
                          {"tiny-generator": generator.target}) as services, \
            httpx.Client(base_url=services.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                         timeout=90) as client:
        # when: an extract job the random-weight generator cannot answer validly
        submitted = client.post("/v1/jobs", json={"task": "invoice_fields", "input": {"text": INVOICE}})
        assert submitted.status_code == 202, submitted.text
        job_id, trace_id = submitted.json()["id"], submitted.json()["trace_id"]
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()

    # then: it was escalated after a real small-tier answer
    assert [a["tier"] for a in job["attempts"]][:2] == ["small", "frontier"], job
    assert job["attempts"][0]["outcome"] == "rejected"

    # and the inference server's span of the Generate call is in the job's trace, under the worker's call
    def has_server_span(spans: list[ReceivedSpan]) -> bool:
        return any(s.trace_id == trace_id and s.service_name == k.SERVICE_INFERENCE
                   and s.name.endswith("/Generate") for s in spans)

    spans = [s for s in otlp_receiver.wait_for(has_server_span, timeout_s=60, what="the inference span")
             if s.trace_id == trace_id]
    [server_span] = [s for s in spans if s.service_name == k.SERVICE_INFERENCE and s.name.endswith("/Generate")]
    [client_span] = [s for s in spans if s.span_id == server_span.parent_span_id]
    assert client_span.service_name == k.SERVICE_SMALL_WORKER
    assert client_span.kind == "SPAN_KIND_CLIENT"
    services_in_trace = {s.service_name for s in spans}
    assert {k.SERVICE_API, k.SERVICE_SMALL_WORKER, k.SERVICE_INFERENCE, k.SERVICE_FRONTIER_WORKER} <= services_in_trace

"""POST /v1/jobs against a real API process: acceptance, routing on the job, every kind of refusal."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.jobs import FrontierMode
from tests.api_fixtures import ApiServerFactory, TenantFactory

BANKING = {"task": "banking77_intent", "input": {"text": "My card has not arrived yet."}}


def queued_job_ids(redis_url: str, queue: str) -> list[str]:
    """Job ids in the Celery messages waiting on `queue` (all priority steps), then those waiting for
    it in the tenants' fair lists (fair scheduling: the dispatcher feeds the queue from them)."""
    client = redis.Redis.from_url(redis_url)
    ids = []
    for key in k.priority_list_keys(queue):
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
            ids.extend(args)
    ids += fair_job_ids(client, queue)
    client.close()
    return ids


def fair_job_ids(client: redis.Redis, queue: str, step: int | None = None) -> list[str]:
    """Job ids waiting in `queue`'s fair lists (at `step`, or any), tenant by tenant."""
    pattern = k.fair_tenant_list_key(queue, step, "*") if step is not None else f"{k.fair_base_key(queue)}*:t:*"
    return [raw.decode().split(" ")[0] for key in sorted(client.scan_iter(match=pattern))
            for raw in client.lrange(key, 0, -1)]


def test_submitted_job_is_accepted_stored_and_queued_on_its_tier(api_client: httpx.Client, redis_url: str) -> None:
    # given
    request = {**BANKING, "priority": "high", "metadata": {"ticket": "T-1"}}

    # when
    response = api_client.post("/v1/jobs", json=request)

    # then
    assert response.status_code == 202
    job = response.json()
    assert job["object"] == "job"
    assert job["id"].startswith("job_")
    assert job["status"] == "queued"
    assert job["task"] == "banking77_intent"
    assert job["input"] == {"text": "My card has not arrived yet."}
    assert job["priority"] == "high"
    assert job["metadata"] == {"ticket": "T-1"}
    assert job["route"] == {"tier": "small", "reason": "task_default", "detail": "task default: small",
                            "frontier_mode": "realtime", "frontier_mode_source": "task"}
    assert job["attempts"] == []
    assert "trace_id" in job
    assert "version" not in job
    assert api_client.get(f"/v1/jobs/{job['id']}").json() == job
    assert queued_job_ids(redis_url, k.QUEUE_SMALL) == [job["id"]]


def test_job_of_a_frontier_task_is_queued_on_the_frontier_queue(api_client: httpx.Client, redis_url: str) -> None:
    # given
    request = {"task": "email_summary", "input": {"text": "Hi, please send the contract by Friday. Ann"}}

    # when
    job = api_client.post("/v1/jobs", json=request).json()

    # then
    assert job["route"]["tier"] == "frontier"
    assert queued_job_ids(redis_url, k.QUEUE_FRONTIER) == [job["id"]]
    assert queued_job_ids(redis_url, k.QUEUE_SMALL) == []


def test_local_only_tenant_keeps_a_frontier_task_on_the_small_tier(
        api_server: str, tenant_factory: TenantFactory) -> None:
    # given
    private = tenant_factory("clinic", local_only=True)
    headers = {"Authorization": f"Bearer {private.api_key}"}

    # when
    response = httpx.post(f"{api_server}/v1/jobs", headers=headers,
                          json={"task": "email_summary", "input": {"text": "Patient asks to move the visit."}})

    # then
    assert response.status_code == 202
    job = response.json()
    assert job["local_only"] is True
    assert job["route"]["tier"] == "small"
    assert job["route"]["reason"] == "local_only"


def test_unknown_task_is_refused_with_unknown_task(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", json={"task": "translate", "input": {"text": "hola"}})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "unknown_task"
    assert "banking77_intent" in error["details"]["known_tasks"]


def test_unknown_field_is_refused_naming_the_field(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", json={**BANKING, "temperature": 0.2})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [d["field"] for d in error["details"]] == ["body.temperature"]


@pytest.mark.parametrize(("patch", "field"), [
    ({"input": {"text": 42}}, "body.input.text"),
    ({"priority": "urgent"}, "body.priority"),
    ({"tier": "medium"}, "body.tier"),
    ({"local_only": "yes"}, "body.local_only"),
    ({"metadata": {"ticket": 7}}, "body.metadata.ticket"),
    ({"input": ["text"]}, "body.input"),
])
def test_wrong_types_are_refused_naming_the_field(api_client: httpx.Client, patch: dict[str, object],
                                                  field: str) -> None:
    # when
    response = api_client.post("/v1/jobs", json={**BANKING, **patch})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert field in [d["field"] for d in error["details"]]


def test_body_that_is_not_json_is_refused_with_the_error_shape(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", content=b"{not json", headers={"Content-Type": "application/json"})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"


def test_input_longer_than_the_task_allows_is_refused(api_client: httpx.Client) -> None:
    # given: banking77_intent accepts at most 2000 characters
    request = {"task": "banking77_intent", "input": {"text": "x" * 2001}}

    # when
    response = api_client.post("/v1/jobs", json=request)

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "input_too_long"
    assert error["details"] == {"input_chars": 2001, "max_input_chars": 2000}


def test_input_missing_a_task_field_or_carrying_an_unknown_one_is_refused(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", json={"task": "banking77_intent", "input": {"body": "hello"}})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["details"]["missing"] == ["text"]
    assert error["details"]["unknown"] == ["body"]


def test_frontier_hint_on_a_local_only_job_is_refused(api_client: httpx.Client) -> None:
    # when
    response = api_client.post("/v1/jobs", json={**BANKING, "tier": "frontier", "local_only": True})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "local_only_conflict"


def test_body_over_the_size_limit_is_413(api_client: httpx.Client) -> None:
    # given: a body above the 1 MiB default, with a Content-Length
    request = {**BANKING, "metadata": {"blob": "x" * 500}, "input": {"text": "y" * (1024 * 1024 + 10)}}

    # when
    response = api_client.post("/v1/jobs", json=request)

    # then
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_streamed_body_over_the_size_limit_is_413(api_client: httpx.Client) -> None:
    # given: a chunked body (no Content-Length) that grows past the limit
    def chunks():
        yield b'{"task": "banking77_intent", "input": {"text": "'
        for _ in range(40):
            yield b"z" * 32 * 1024
        yield b'"}}'

    # when
    response = api_client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})

    # then
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_missing_or_unknown_api_key_is_401_with_a_challenge(api_server: str) -> None:
    # when
    missing = httpx.post(f"{api_server}/v1/jobs", json=BANKING)
    unknown = httpx.post(f"{api_server}/v1/jobs", json=BANKING, headers={"Authorization": "Bearer sf_live_nope"})
    wrong_scheme = httpx.get(f"{api_server}/v1/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="})

    # then
    for response in (missing, unknown, wrong_scheme):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in unknown.headers["WWW-Authenticate"]


def test_unknown_path_and_method_answer_in_the_error_shape(api_client: httpx.Client) -> None:
    # when
    not_found = api_client.get("/v1/nothing-here")
    wrong_method = api_client.delete("/v1/jobs")
    no_job = api_client.get("/v1/jobs/job_doesnotexist")

    # then
    assert not_found.status_code == 404
    assert not_found.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert no_job.status_code == 404
    assert no_job.json()["error"]["code"] == "job_not_found"


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/hook",
    "http://localhost/hook",
    "http://10.1.2.3/hook",
    "http://169.254.169.254/latest/meta-data",
    "http://[::1]/hook",
    "ftp://93.184.216.34/hook",
])
def test_callback_url_to_a_private_or_odd_target_is_refused(
        api_server_factory: ApiServerFactory, tenant_factory: TenantFactory, url: str) -> None:
    # given: an API whose operator has not allowed private callback targets
    server = api_server_factory(allow_private_callbacks="false")
    credentials = tenant_factory("acme")

    # when
    response = httpx.post(f"{server.url}/v1/jobs", json={**BANKING, "callback_url": url},
                          headers={"Authorization": f"Bearer {credentials.api_key}"})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "callback_url_not_allowed"


def test_callback_url_to_a_public_address_is_accepted(
        api_server_factory: ApiServerFactory, tenant_factory: TenantFactory) -> None:
    # given
    server = api_server_factory(allow_private_callbacks="false")
    credentials = tenant_factory("acme")

    # when: an address literal, so that no DNS is needed on this offline machine
    response = httpx.post(f"{server.url}/v1/jobs", json={**BANKING, "callback_url": "https://93.184.216.34/hook"},
                          headers={"Authorization": f"Bearer {credentials.api_key}"})

    # then
    assert response.status_code == 202
    assert response.json()["callback_url"] == "https://93.184.216.34/hook"


def test_tasks_are_listed_and_shown(api_client: httpx.Client) -> None:
    # when
    listing = api_client.get("/v1/tasks")
    one = api_client.get("/v1/tasks/invoice_fields")
    missing = api_client.get("/v1/tasks/nope")

    # then
    assert listing.status_code == 200
    names = [task["name"] for task in listing.json()["data"]]
    assert {"banking77_intent", "invoice_fields", "email_summary"} <= set(names)
    assert one.json()["kind"] == "extract"
    assert one.json()["schema"]["required"]
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "unknown_task"


def test_openapi_document_describes_the_job_api(api_server: str) -> None:
    # when
    document = httpx.get(f"{api_server}/openapi.json").json()
    docs_page = httpx.get(f"{api_server}/docs")

    # then
    assert docs_page.status_code == 200
    schemas = document["components"]["schemas"]
    assert {"JobRequest", "JobResource", "BatchRequest", "BatchResponse", "ErrorResponse", "StatsResponse"} <= set(
        schemas)
    assert set(document["paths"]) >= {"/v1/jobs", "/v1/jobs/batch", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                                      "/v1/tasks", "/v1/stats", "/healthz", "/readyz"}
    assert "task_id" not in schemas["AttemptResource"]["properties"]
    assert document["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    assert document["paths"]["/v1/jobs"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in document["paths"]["/healthz"]["get"]
    assert "HTTPValidationError" not in schemas
    invalid = document["paths"]["/v1/tasks/{name}"]["get"]["responses"]["422"]
    assert invalid["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    batch_items = schemas["BatchRequest"]["properties"]["jobs"]["items"]
    assert batch_items == {"$ref": "#/components/schemas/JobRequest"}


def test_the_frontier_mode_of_the_job_overrides_the_tenants_and_is_stored_on_the_route(
        api_server: str, tenant_factory: TenantFactory) -> None:
    # given: a tenant whose frontier work goes in batches by default
    credentials = tenant_factory("batchy", frontier_mode=FrontierMode.BATCH)
    summary = {"task": "email_summary", "input": {"text": "Please move my order to Friday."}}

    # when
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {credentials.api_key}"},
                      timeout=30) as http:
        by_tenant = http.post("/v1/jobs", json=summary).json()
        by_job = http.post("/v1/jobs", json={**summary, "frontier_mode": "realtime"}).json()
        auto_low = http.post("/v1/jobs", json={**summary, "frontier_mode": "auto", "priority": "low"}).json()
        refused = http.post("/v1/jobs", json={**summary, "frontier_mode": "sometimes"})

    # then
    assert (by_tenant["route"]["frontier_mode"], by_tenant["route"]["frontier_mode_source"]) == ("batch", "tenant")
    assert (by_job["route"]["frontier_mode"], by_job["route"]["frontier_mode_source"]) == ("realtime", "job")
    assert by_job["frontier_mode"] == "realtime"
    assert auto_low["route"]["frontier_mode"] == "batch"
    assert auto_low["route"]["frontier_mode_source"] == "job:auto:low_priority"
    assert refused.status_code == 422
    assert refused.json()["error"]["code"]

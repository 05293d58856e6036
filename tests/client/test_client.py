"""The Python client (`smallfirst_client`) against the real API (uvicorn on a free port, real Redis).

No workers run: where a job must end, the test ends it as a worker does (`tests.api.worker_sim`).
The async client runs under `asyncio.run` (the venv has no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from smallfirst.api.app import create_app
from smallfirst.api.settings import ApiSettings
from smallfirst.common.catalog import Catalog, default_catalog_path
from smallfirst.common.errors import InfrastructureError
from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant
from smallfirst.common.webhooks import generate_secret, signature_headers
from smallfirst_client import (
    ApiError,
    AsyncClient,
    Client,
    JobStatus,
    RetryPolicy,
    WaitTimeout,
    WebhookVerificationError,
    job_body,
    verify,
)
from smallfirst_client.models import OPENAPI_COMPONENTS
from tests.api import worker_sim
from tests.support.tcp_proxy import FaultyProxy

BANKING = ("banking77_intent", {"text": "Where is my new card?"})
EMAIL = ("email_summary", {"text": "Please call me back about the invoice."})
# Retries without waiting long: the behaviour under test is how often, not how long.
QUICK = RetryPolicy(max_retries=5, backoff_base_s=0.01, backoff_cap_s=0.05)


@pytest.fixture
def proxy(api_server: str) -> Iterator[FaultyProxy]:
    """A TCP proxy in front of the API that drops or refuses connections when told to."""
    address = urlsplit(api_server)
    assert address.hostname is not None
    assert address.port is not None
    running = FaultyProxy(address.hostname, address.port).start()
    yield running
    running.stop()


@pytest.fixture
def client(api_server: str, tenant: IssuedTenant) -> Iterator[Client]:
    with Client(api_server, tenant.api_key, retry=QUICK) as sf:
        yield sf


def test_the_clients_models_have_the_fields_of_the_apis_schemas() -> None:
    # given the API's OpenAPI document (creating the app needs no Redis)
    settings = ApiSettings(redis_url="redis://127.0.0.1:1/0", catalog_path=default_catalog_path())
    schemas = create_app(settings).openapi()["components"]["schemas"]

    # when / then every client model has exactly the fields of the schema it mirrors
    for component, model in OPENAPI_COMPONENTS.items():
        assert set(model.model_fields) == set(schemas[component]["properties"]), component
        required = {name for name, info in model.model_fields.items() if info.is_required()}
        assert required <= set(schemas[component].get("required", [])), component


def test_a_submit_retried_after_a_dropped_connection_creates_exactly_one_job(
        proxy: FaultyProxy, tenant: IssuedTenant, api_client: httpx.Client) -> None:
    # given a connection that drops after the API took the request (and answered it)
    proxy.drop_after_forwarding = 1

    # when the sync client submits through it
    with Client(proxy.url, tenant.api_key, retry=QUICK) as sf:
        job = sf.submit(*BANKING, metadata={"order": "1234"})

    # then the retry got the first answer: the tenant has exactly that one job
    assert proxy.dropped == 1
    assert proxy.connections >= 2
    stored = api_client.get("/v1/jobs").json()["data"]
    assert [j["id"] for j in stored] == [job.id]
    assert job.status is JobStatus.QUEUED
    assert job.metadata == {"order": "1234"}


def test_an_async_batch_retried_after_a_dropped_connection_creates_each_job_once(
        proxy: FaultyProxy, tenant: IssuedTenant, api_client: httpx.Client) -> None:
    # given a connection that drops after the API took the request
    proxy.drop_after_forwarding = 1

    # when the async client submits a batch of three through it
    async def submit() -> list[str]:
        async with AsyncClient(proxy.url, tenant.api_key, retry=QUICK) as sf:
            batch = await sf.submit_batch([job_body(*BANKING) for _ in range(3)])
            return [r.job.id for r in batch.results if r.job is not None]

    ids = asyncio.run(submit())

    # then the tenant has exactly those three jobs
    assert proxy.dropped == 1
    assert len(ids) == 3
    stored = api_client.get("/v1/jobs").json()["data"]
    assert sorted(j["id"] for j in stored) == sorted(ids)


def test_a_503_with_retry_after_is_retried_and_submits_once(
        proxy: FaultyProxy, tenant: IssuedTenant, api_client: httpx.Client) -> None:
    # given two answers of 503 with Retry-After: 0 before the API is reached
    proxy.answer_503 = 2

    # when the client submits
    with Client(proxy.url, tenant.api_key, retry=QUICK) as sf:
        job = sf.submit(*BANKING)

    # then it got through on the third try, with one job stored
    assert proxy.refused == 2
    assert [j["id"] for j in api_client.get("/v1/jobs").json()["data"]] == [job.id]


def test_a_client_that_runs_out_of_retries_raises_the_apis_error(proxy: FaultyProxy, tenant: IssuedTenant) -> None:
    # given more 503s than the client retries
    proxy.answer_503 = 10

    # when / then
    with Client(proxy.url, tenant.api_key, retry=RetryPolicy(max_retries=2, backoff_base_s=0.01)) as sf, \
            pytest.raises(ApiError) as raised:
        sf.submit(*BANKING)
    assert raised.value.status == 503
    assert raised.value.code == "unavailable"


def end_later(job_store: JobStore, job_id: str, answer: object) -> threading.Thread:
    """Ends the job from another thread, as a worker would, while the client waits."""
    thread = threading.Thread(target=worker_sim.succeed, args=(job_store, job_id),
                              kwargs={"answer": answer}, daemon=True)
    thread.start()
    return thread


def test_wait_returns_the_final_job(client: Client, job_store: JobStore) -> None:
    # given a job that a worker ends while the client waits
    job = client.submit(*BANKING)
    worker = end_later(job_store, job.id, {"label": "card_arrival"})

    # when the client waits for it
    done = client.wait(job.id, timeout_s=120)
    worker.join()

    # then it gets the final job, with its result and its attempt
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == {"label": "card_arrival"}
    assert [a.outcome for a in done.attempts] == ["accepted"]


def test_async_wait_returns_the_final_job(api_server: str, tenant: IssuedTenant, job_store: JobStore) -> None:
    async def scenario() -> tuple[str, JobStatus, object]:
        async with AsyncClient(api_server, tenant.api_key, retry=QUICK) as sf:
            # given a job that a worker ends while the client waits
            job = await sf.submit(*BANKING)
            worker = end_later(job_store, job.id, {"label": "card_arrival"})
            # when the client waits for it
            done = await sf.wait(job.id, timeout_s=120)
            worker.join()
            return done.id, done.status, done.result

    # then it gets the final job
    job_id, status, result = asyncio.run(scenario())
    assert status is JobStatus.SUCCEEDED
    assert result == {"label": "card_arrival"}
    assert job_id.startswith("job_")


def test_wait_gives_up_after_its_total_timeout_with_the_jobs_last_state(client: Client) -> None:
    # given a job nobody runs
    job = client.submit(*BANKING)

    # when / then the wait ends with the job as it last saw it
    with pytest.raises(WaitTimeout) as raised:
        client.wait(job.id, timeout_s=0.5)
    assert raised.value.job.id == job.id
    assert raised.value.job.status is JobStatus.QUEUED


def test_iterating_jobs_walks_every_page_once(client: Client, api_server: str, tenant: IssuedTenant) -> None:
    # given five jobs
    ids = {client.submit(*BANKING).id for _ in range(5)}

    # when the sync and the async client iterate two to a page
    seen = [job.id for job in client.iter_jobs(page_size=2)]

    async def iterate() -> list[str]:
        async with AsyncClient(api_server, tenant.api_key) as sf:
            return [job.id async for job in sf.iter_jobs(page_size=2)]

    # then each sees every job once, newest first
    assert set(seen) == ids
    assert len(seen) == 5
    assert asyncio.run(iterate()) == seen


def test_cancel_is_typed_and_a_second_cancel_is_the_apis_conflict(client: Client) -> None:
    # given a queued job
    job = client.submit(*BANKING)

    # when it is cancelled twice
    cancelled = client.cancel(job.id)
    with pytest.raises(ApiError) as raised:
        client.cancel(job.id)

    # then the first answer is the cancelled job, the second the API's error with its code
    assert cancelled.status is JobStatus.CANCELLED
    assert raised.value.status == 409
    assert raised.value.code == "job_already_ended"


def test_dead_letters_are_listed_and_replayed_through_the_client(
        client: Client, job_store: JobStore, catalog: Catalog) -> None:
    # given a frontier job that failed past its deadline
    job = client.submit(*EMAIL, deadline_s=0.001)
    worker_sim.fail_by_outcome(job_store, catalog, job.id, InfrastructureError("frontier down"), Tier.FRONTIER)

    # when the client lists the dead letters and replays the job
    entries = list(client.iter_dead_letters(reason="deadline_exceeded"))
    replayed = client.replay(job.id, deadline_s=60)

    # then the entry named the job and its reason, and the job is queued again with its history
    assert [(e.job_id, e.reason) for e in entries] == [(job.id, "deadline_exceeded")]
    assert replayed.status is JobStatus.QUEUED
    assert replayed.replays == 1
    assert len(replayed.attempts) == 1
    assert client.list_dead_letters().data == []
    assert client.replay_dead_letters(reason="deadline_exceeded").replayed == []


def test_feedback_is_sent_to_the_documented_route(client: Client, api_server: str, job_store: JobStore) -> None:
    # given an API that has the feedback route (it comes with the learning small tier)
    paths = httpx.get(f"{api_server}/openapi.json").json()["paths"]
    if "/v1/jobs/{job_id}/feedback" not in paths:
        pytest.skip("this API has no POST /v1/jobs/{id}/feedback yet")
    job = client.submit(*BANKING)
    worker_sim.succeed(job_store, job.id, answer={"label": "card_arrival"})

    # when the tenant sends the correct answer
    answer = client.feedback(job.id, {"label": "lost_or_stolen_card"}, comment="the customer lost it")

    # then the API took it
    assert answer


def test_a_webhook_signed_by_smallfirst_verifies_and_a_tampered_one_does_not() -> None:
    # given a delivery signed as the webhooks pool signs it
    secret = generate_secret()
    body = b'{"object": "job", "id": "job_1", "status": "succeeded"}'
    headers = signature_headers(secret, "msg_1", body)

    # when / then the client accepts it and returns the job, and refuses a changed body or secret
    assert verify(secret, headers, body)["id"] == "job_1"
    with pytest.raises(WebhookVerificationError):
        verify(secret, headers, body.replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookVerificationError):
        verify(generate_secret(), headers, body)
    with pytest.raises(WebhookVerificationError, match="tolerance"):
        verify(secret, headers, body, now=int(headers["webhook-timestamp"]) + 3600)

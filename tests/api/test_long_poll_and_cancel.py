"""GET /v1/jobs/{id}?wait=S returns when the job ends; POST /v1/jobs/{id}/cancel."""

from __future__ import annotations

import threading
import time

import httpx

from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from tests.api import worker_sim

GOOD = {"task": "banking77_intent", "input": {"text": "I lost my card yesterday."}}
WAIT_BUDGET_S = 30


def test_long_poll_returns_as_soon_as_the_job_ends(api_client: httpx.Client, job_store: JobStore) -> None:
    # given: a queued job that a "worker" finishes a moment after the long-poll starts
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]

    def finish_later() -> None:
        time.sleep(1.0)
        worker_sim.succeed(job_store, job_id, answer={"label": "lost_or_stolen_card"})

    worker = threading.Thread(target=finish_later)

    # when
    started = time.monotonic()
    worker.start()
    response = api_client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_BUDGET_S})
    waited_s = time.monotonic() - started
    worker.join()

    # then: it answered with the ended job, long before its wait budget ran out
    assert response.status_code == 200
    assert response.json()["status"] == "succeeded"
    assert response.json()["result"] == {"label": "lost_or_stolen_card"}
    assert waited_s < WAIT_BUDGET_S / 2


def test_long_poll_on_an_ended_job_answers_at_once(api_client: httpx.Client, job_store: JobStore) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    worker_sim.fail(job_store, job_id)

    # when
    response = api_client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_BUDGET_S}, timeout=WAIT_BUDGET_S / 2)

    # then
    assert response.json()["status"] == "failed"


def test_long_poll_of_a_job_that_does_not_end_returns_its_state_after_the_wait(
        api_client: httpx.Client, job_store: JobStore) -> None:
    # given: a job that starts running but does not end
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    worker_sim.begin(job_store, job_id, Tier.SMALL)

    # when
    response = api_client.get(f"/v1/jobs/{job_id}", params={"wait": 1})

    # then
    assert response.status_code == 200
    assert response.json()["status"] == "running"


def test_wait_beyond_sixty_seconds_is_refused(api_client: httpx.Client) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]

    # when
    response = api_client.get(f"/v1/jobs/{job_id}", params={"wait": 61})

    # then
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "query.wait"


def test_cancel_ends_a_queued_job_and_wakes_its_long_poll(api_client: httpx.Client) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    polled: dict[str, httpx.Response] = {}
    poller = threading.Thread(target=lambda: polled.setdefault(
        "response", api_client.get(f"/v1/jobs/{job_id}", params={"wait": WAIT_BUDGET_S})))
    poller.start()
    time.sleep(0.5)

    # when
    response = api_client.post(f"/v1/jobs/{job_id}/cancel")
    poller.join(timeout=WAIT_BUDGET_S / 2)

    # then
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    assert response.json()["ended_at"] is not None
    assert not poller.is_alive()
    assert polled["response"].json()["status"] == "cancelled"


def test_cancel_of_an_ended_job_is_409_with_the_job(api_client: httpx.Client, job_store: JobStore) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    worker_sim.succeed(job_store, job_id, answer={"label": "lost_or_stolen_card"})

    # when
    response = api_client.post(f"/v1/jobs/{job_id}/cancel")

    # then
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "job_already_ended"
    assert error["details"]["job"]["id"] == job_id
    assert error["details"]["job"]["status"] == "succeeded"


def test_cancel_twice_is_409_the_second_time(api_client: httpx.Client) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    api_client.post(f"/v1/jobs/{job_id}/cancel")

    # when
    again = api_client.post(f"/v1/jobs/{job_id}/cancel")

    # then
    assert again.status_code == 409
    assert again.json()["error"]["details"]["job"]["status"] == "cancelled"


def test_cancel_of_a_running_job_closes_its_attempt(api_client: httpx.Client, job_store: JobStore) -> None:
    # given
    job_id = api_client.post("/v1/jobs", json=GOOD).json()["id"]
    worker_sim.begin(job_store, job_id, Tier.SMALL)

    # when
    response = api_client.post(f"/v1/jobs/{job_id}/cancel")

    # then
    assert response.json()["status"] == "cancelled"
    assert response.json()["attempts"][0]["outcome"] == "cancelled"
    assert job_store.get(job_id).status.value == "cancelled"

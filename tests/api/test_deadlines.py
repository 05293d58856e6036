"""A job's deadline: given on submit or taken from its priority's default, and kept on the job."""

from __future__ import annotations

import httpx
import pytest

BANKING = {"task": "banking77_intent", "input": {"text": "My card has not arrived yet."}}


@pytest.mark.parametrize(("priority", "default_s"), [("high", 300.0), ("normal", 3600.0), ("low", 86400.0)])
def test_a_job_without_a_deadline_gets_its_prioritys_default(api_client: httpx.Client, priority: str,
                                                             default_s: float) -> None:
    # when
    job = api_client.post("/v1/jobs", json={**BANKING, "priority": priority}).json()

    # then
    assert job["deadline_at"] == pytest.approx(job["created_at"] + default_s)
    assert job["retry_at"] is None


def test_a_deadline_given_on_submit_is_kept(api_client: httpx.Client) -> None:
    # when
    job = api_client.post("/v1/jobs", json={**BANKING, "deadline_s": 42.5}).json()

    # then
    assert job["deadline_at"] == pytest.approx(job["created_at"] + 42.5)


@pytest.mark.parametrize("deadline_s", [0, -1, 8 * 24 * 3600, "soon"])
def test_an_impossible_deadline_is_refused_with_a_field_error(api_client: httpx.Client, deadline_s: object) -> None:
    # when
    response = api_client.post("/v1/jobs", json={**BANKING, "deadline_s": deadline_s})

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert [d["field"] for d in error["details"]] == ["body.deadline_s"]

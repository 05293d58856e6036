"""Feedback on a job, a task's model and the examples export, through the API (real Redis, real
API process; a worker is played with the workers' own store, see worker_sim.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant
from tests.api import worker_sim
from tests.api_fixtures import TenantFactory

TASK = "banking77_intent"
MESSAGE = {"task": TASK, "input": {"text": "I still have not received my new card"}}


@pytest.fixture(scope="module")
def catalog_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example catalog, its Banking77 task learning."""
    folder = tmp_path_factory.mktemp("learning-catalog")
    for source in default_catalog_path().glob("*.yaml"):
        document = yaml.safe_load(source.read_text())
        for task in document["tasks"]:
            if task["name"] == TASK:
                task["learning"] = {"enabled": True, "target_accuracy": 0.97}
        (folder / source.name).write_text(yaml.safe_dump(document))
    return folder


def ended_job(api_client: httpx.Client, job_store: JobStore, label: str = "card_arrival") -> str:
    job_id: str = api_client.post("/v1/jobs", json=MESSAGE).json()["id"]
    worker_sim.succeed(job_store, job_id, tier=Tier.SMALL, answer={"label": label})
    return job_id


def test_feedback_is_shown_on_the_job_counted_and_kept_as_an_example(
        api_client: httpx.Client, job_store: JobStore, redis_url: str, catalog_path: Path) -> None:
    # given: a job the small tier answered wrongly
    job_id = ended_job(api_client, job_store, label="card_linking")
    # when: the tenant gives the right answer
    response = api_client.post(f"/v1/jobs/{job_id}/feedback",
                               json={"answer": {"label": "card_arrival"}, "comment": "it is about arrival"})
    # then: the job shows it, the stats count an error found on the small tier, and it is an example
    assert response.status_code == 200, response.text
    feedback = response.json()["feedback"]
    assert (feedback["answer"], feedback["agrees"], feedback["served_by"]) == ({"label": "card_arrival"}, False,
                                                                               "small")
    assert api_client.get(f"/v1/jobs/{job_id}").json()["feedback"] == feedback
    stats = api_client.get("/v1/stats", params={"task": TASK}).json()["tasks"][0]
    assert (stats["feedback"], stats["feedback_errors"]) == (1, {"small": 1})
    task = load_catalog(catalog_path).get(TASK)
    assert task is not None
    example = ExampleMemory(redis.Redis.from_url(redis_url)).get(task, job_id)
    assert example is not None
    assert (example.label, example.source, example.model) == ("card_arrival", ExampleSource.FEEDBACK, "feedback")


def test_feedback_is_idempotent_per_job(api_client: httpx.Client, job_store: JobStore) -> None:
    # given: feedback given once
    job_id = ended_job(api_client, job_store)
    first = api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "card_arrival"}})
    # when: the same again, and then another answer
    again = api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "card_arrival"}})
    other = api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "exchange_rate"}})
    # then: the repeat changes nothing; another answer is a conflict
    assert first.status_code == again.status_code == 200
    assert again.json()["feedback"] == first.json()["feedback"]
    assert first.json()["feedback"]["agrees"] is True
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "feedback_already_given"
    stats = api_client.get("/v1/stats", params={"task": TASK}).json()["tasks"][0]
    assert (stats["feedback"], stats["feedback_errors"]) == (1, {})


def test_feedback_on_another_tenants_job_is_404(api_client: httpx.Client, job_store: JobStore, api_server: str,
                                                tenant_factory: TenantFactory) -> None:
    # given: a job of this tenant, and another tenant
    job_id = ended_job(api_client, job_store)
    other: IssuedTenant = tenant_factory("other")
    # when
    with httpx.Client(base_url=api_server, headers={"Authorization": f"Bearer {other.api_key}"}) as client:
        response = client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "card_arrival"}})
    # then
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_feedback_with_a_label_not_of_the_task_is_422(api_client: httpx.Client, job_store: JobStore) -> None:
    job_id = ended_job(api_client, job_store)
    response = api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "no_such_intent"}})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_feedback"


def test_the_model_route_and_the_export_show_the_tasks_examples(api_client: httpx.Client,
                                                                job_store: JobStore) -> None:
    # given: two corrections
    ids = [ended_job(api_client, job_store) for _ in range(2)]
    for job_id in ids:
        api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "card_arrival"}})
    # when
    model = api_client.get(f"/v1/tasks/{TASK}/model").json()
    exported = api_client.get(f"/v1/tasks/{TASK}/examples")
    # then: no head yet (the seed scorer answers), two feedback examples; the export round-trips
    assert model["scorer"] == "seed_nearest_neighbour"
    assert model["examples"]["by_source"] == {"feedback": 2}
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert sorted(line["job_id"] for line in lines) == sorted(ids)
    assert {(line["text"], json.dumps(line["answer"]), line["source"]) for line in lines} == {
        (MESSAGE["input"]["text"], json.dumps({"label": "card_arrival"}), "feedback")}  # type: ignore[index]


def test_exporting_the_examples_of_an_unknown_task_is_a_404_before_any_line(api_client: httpx.Client) -> None:
    # when
    response = api_client.get("/v1/tasks/no_such_task/examples")
    # then: an error in the documented shape, not a stream cut short
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_task"


def test_the_dashboards_learning_page_shows_the_tenants_examples_by_source(
        api_client: httpx.Client, api_server: str, job_store: JobStore, tenant: IssuedTenant) -> None:
    # given: a job of a learning task corrected by feedback (kept as a feedback example)
    job_id = ended_job(api_client, job_store, label="card_linking")
    given = api_client.post(f"/v1/jobs/{job_id}/feedback", json={"answer": {"label": "card_arrival"}})
    assert given.status_code == 200, given.text
    # when: the tenant opens the dashboard's learning page
    with httpx.Client(base_url=api_server, timeout=30) as ui:
        form = ui.get("/ui/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
        assert token is not None, form.text
        ui.post("/ui/login", data={"csrf_token": token.group(1), "api_key": tenant.api_key, "next": "/ui/learning"})
        page = ui.get("/ui/learning")
    # then: the task's examples are counted per source, the feedback among them, next to the seeds
    assert page.status_code == 200, page.text
    section = page.text.split(f'data-task="{TASK}"', 1)[1].split("</section>", 1)[0]
    assert "feedback: 1</span>" in section
    assert "catalog seed examples: " in section

"""A task that learns, on the whole stack: a running small worker picks up each new head version
without a restart, and frontier answers become examples of the task."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import Task, default_catalog_path, load_catalog
from smallfirst.common.examples import Example, ExampleMemory, ExampleSource
from smallfirst.common.tenants import TenantRegistry
from smallfirst.small_worker.heads import TrainedHead, publish_head
from smallfirst.small_worker.label_index import text_digest
from tests.e2e.conftest import submit_and_wait
from tests.inference_fixtures import InferenceServerHandle
from tests.support.procs import require_binary

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

TASK = "banking77_intent"
MODEL = "all-minilm-l6-v2"
MESSAGE = "It's been a week since I ordered my card and it's not here. Please help?"
ESCALATED = ("my card still has not arrived, where is it?", "where is my card??", "is my card on its way?")


def learning_catalog(folder: Path) -> Path:
    """The example catalog with its Banking77 task learning (no training on its own: the tests
    publish heads themselves)."""
    folder.mkdir()
    for source in default_catalog_path().glob("*.yaml"):
        document = yaml.safe_load(source.read_text())
        for task in document["tasks"]:
            if task["name"] == TASK:
                task["learning"] = {"enabled": True, "target_accuracy": 0.97, "min_examples": 10_000,
                                    "retrain_every": 10_000}
        (folder / source.name).write_text(yaml.safe_dump(document))
    return folder


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, embedding_server_session: InferenceServerHandle,
          generator_server_session: InferenceServerHandle) -> Iterator[Stack]:
    require_binary("redis-server")
    workdir = tmp_path_factory.mktemp("learning-stack")
    labels = workdir / "labels.csv"
    labels.write_text("text,label\n" + "".join(f'"{text}",card_arrival\n' for text in (MESSAGE, *ESCALATED)))
    config = StackConfig(workdir=workdir, catalog_path=learning_catalog(workdir / "catalog"),
                         frontier_sim_args=["--strategy", "oracle", "--labels", str(labels)],
                         small_concurrency=4, frontier_concurrency=2,
                         inference_ports={"embed": embedding_server_session.port,
                                          "generate": generator_server_session.port})
    running = Stack(config)
    try:
        running.start_all()
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def client(stack: Stack) -> Iterator[httpx.Client]:
    tenant = TenantRegistry(redis.Redis.from_url(stack.redis_url)).create(f"learner-{time.monotonic_ns()}")
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                      timeout=90) as http:
        yield http


def head(version: int, threshold: float, classes: tuple[str, ...]) -> TrainedHead:
    """A head that answers `card_arrival` for everything, with the given gate."""
    dims = 384
    weights = np.zeros((len(classes), dims), dtype=np.float32)
    bias = np.zeros(len(classes), dtype=np.float32)
    bias[classes.index("card_arrival")] = 20.0
    support = np.full((1, dims), 1 / np.sqrt(dims), dtype=np.float32)
    return TrainedHead(version=version, classes=classes, weights=weights, bias=bias, support=support,
                       threshold=threshold, novelty_floor=2.0)


def wait_for_example(memory: ExampleMemory, task: Task, job_id: str, timeout_s: float = 30) -> Example | None:
    deadline = time.monotonic() + timeout_s
    while (example := memory.get(task, job_id)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return example


def small_kept(job: dict[str, Any]) -> bool:
    return job["status"] == "succeeded" and job["attempts"][-1]["tier"] == "small"


def test_a_new_head_version_reaches_the_running_worker_without_a_restart(stack: Stack, client: httpx.Client) -> None:
    # given: a running stack whose worker already answered with the seed scorer (no head yet)
    store = redis.Redis.from_url(stack.redis_url)
    classes = tuple(label.name for label in load_catalog(stack.config.catalog_path).get(TASK).labels)  # type: ignore[union-attr]
    first = submit_and_wait(client, {"task": TASK, "input": {"text": MESSAGE}})
    assert small_kept(first), first
    worker_pid = stack.components["worker-small"].proc.pid  # type: ignore[union-attr]

    # when: a head that must escalate everything (threshold above 1) goes live
    publish_head(store, TASK, MODEL, head(version=1, threshold=1.5, classes=classes))
    # then: within seconds the same worker answers with it, and escalates
    deadline = time.monotonic() + 60
    while True:
        job = submit_and_wait(client, {"task": TASK, "input": {"text": MESSAGE}})
        if any("head v1" in reason for reason in job["escalation_reasons"]) or time.monotonic() > deadline:
            break
    assert any("learned_threshold" in reason and "head v1" in reason for reason in job["escalation_reasons"]), job

    # when: version 2, which keeps what it is sure of, replaces it
    publish_head(store, TASK, MODEL, head(version=2, threshold=0.5, classes=classes))
    deadline = time.monotonic() + 60
    while True:
        job = submit_and_wait(client, {"task": TASK, "input": {"text": MESSAGE}})
        if small_kept(job) or time.monotonic() > deadline:
            break
    # then: the small tier keeps the answer again, with the head's confidence, from the same process
    assert small_kept(job), job
    assert job["attempts"][-1]["confidence"] > 0.99
    assert stack.components["worker-small"].proc.pid == worker_pid  # type: ignore[union-attr]


def test_an_escalated_jobs_frontier_answer_becomes_an_example_with_its_vector(stack: Stack,
                                                                              client: httpx.Client) -> None:
    # given: a live head that escalates everything
    store = redis.Redis.from_url(stack.redis_url)
    task = load_catalog(stack.config.catalog_path).get(TASK)
    assert task is not None
    publish_head(store, TASK, MODEL, head(version=10, threshold=1.5, classes=task.label_names))
    time.sleep(3)  # the workers' poll interval (2 s): the test is about the example, not the pick-up
    # when: a job escalates and the frontier answers it
    job = submit_and_wait(client, {"task": TASK, "input": {"text": ESCALATED[0]}})
    # then: its answer is an example of the task
    assert job["status"] == "succeeded", job
    assert job["attempts"][-1]["tier"] == "frontier", job
    # (kept right after the job's result is stored, so it may land a moment after the job ends)
    example = wait_for_example(ExampleMemory(store), task, job["id"])
    assert example is not None
    assert (example.label, example.source, example.text) == ("card_arrival", ExampleSource.FRONTIER, ESCALATED[0])
    # and a job that opted out leaves nothing behind
    opted = submit_and_wait(client, {"task": TASK, "input": {"text": ESCALATED[1]}, "learning": False})
    assert opted["attempts"][-1]["tier"] == "frontier", opted
    # (a later job's example present means the opted-out job's step after its result has run)
    later = submit_and_wait(client, {"task": TASK, "input": {"text": ESCALATED[2]}})
    assert wait_for_example(ExampleMemory(store), task, later["id"]) is not None
    assert ExampleMemory(store).get(task, opted["id"]) is None
    # and its input is not among the recent inputs that the trainer labels and learns from, which
    # the taught jobs' inputs are
    assert store.get(k.input_vector_key(MODEL, text_digest(ESCALATED[1]))) is None
    recent = set(store.lrange(k.recent_inputs_key(TASK, MODEL), 0, -1))
    assert store.get(k.input_vector_key(MODEL, text_digest(ESCALATED[2]))) in recent

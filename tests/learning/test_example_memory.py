"""The example memory against a real Redis: what is kept, the cap per label, retention, deletion."""

from __future__ import annotations

import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def learning_task(catalog: Catalog, **policy: object) -> Task:
    task = catalog.get("banking77_intent")
    assert task is not None
    return task.model_copy(update={"learning": task.learning.model_copy(update={"enabled": True, **policy})})


def job(job_id: str, text: str, *, tenant: str = "t1", learning: bool = True, local_only: bool = False) -> Job:
    return Job(id=job_id, tenant=tenant, task="banking77_intent", input={"text": text}, learning=learning,
               local_only=local_only, route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT),
               created_at=0.0, updated_at=0.0, queued_at=0.0)


def test_a_frontier_answer_is_kept_with_its_provenance(redis_url: str, catalog: Catalog) -> None:
    # given
    client = redis.Redis.from_url(redis_url)
    memory = ExampleMemory(client, clock=Clock(1000.0))
    task = learning_task(catalog)
    # when
    memory.record(task, job("job_a", "my card never came"), "card_arrival", ExampleSource.FRONTIER, model="claude-x")
    # then: text, label, source, job, tenant, model and time are stored, and every key expires
    [example] = memory.all(task)
    assert (example.text, example.label, example.source, example.job_id, example.tenant, example.model,
            example.created_at) == ("my card never came", "card_arrival", ExampleSource.FRONTIER, "job_a", "t1",
                                    "claude-x", 1000.0)
    assert memory.added(task) == 1
    for key in (k.examples_key(task.name, task.small.model), k.examples_by_time_key(task.name, task.small.model),
                k.examples_by_label_key(task.name, task.small.model, "card_arrival"), k.tenant_examples_key("t1")):
        assert 0 < client.ttl(key) <= 90 * 86400


def test_the_cap_per_label_drops_that_labels_oldest_examples(redis_url: str, catalog: Catalog) -> None:
    # given: a cap of 3 examples per label
    clock = Clock(1000.0)
    memory = ExampleMemory(redis.Redis.from_url(redis_url), clock=clock)
    task = learning_task(catalog, max_examples_per_label=3)
    # when: five examples of one label and one of another arrive, one second apart
    for i in range(5):
        clock.now += 1
        memory.record(task, job(f"job_{i}", f"text {i}"), "card_arrival", ExampleSource.FRONTIER, model="m")
    memory.record(task, job("job_x", "rates?"), "exchange_rate", ExampleSource.FRONTIER, model="m")
    # then: the label keeps its three newest; the other label is untouched
    kept = {e.job_id for e in memory.all(task)}
    assert kept == {"job_2", "job_3", "job_4", "job_x"}


def test_examples_older_than_the_retention_are_dropped(redis_url: str, catalog: Catalog) -> None:
    # given: a retention of one day, and an example recorded two days ago
    clock = Clock(1_000_000.0)
    memory = ExampleMemory(redis.Redis.from_url(redis_url), clock=clock)
    task = learning_task(catalog, retention_days=1.0)
    memory.record(task, job("job_old", "old"), "card_arrival", ExampleSource.FRONTIER, model="m")
    clock.now += 2 * 86400
    memory.record(task, job("job_new", "new"), "card_arrival", ExampleSource.FRONTIER, model="m")
    # when / then: only the recent one is read back, and the old one is gone from Redis
    assert [e.job_id for e in memory.all(task)] == ["job_new"]
    assert memory.get(task, "job_old") is None


def test_opted_out_jobs_and_local_only_inputs_are_not_kept(redis_url: str, catalog: Catalog) -> None:
    # given
    memory = ExampleMemory(redis.Redis.from_url(redis_url))
    task = learning_task(catalog)
    # when: an opted-out job, a local-only job (the task does not keep those), a label not of the task
    kept = [memory.record(task, job("job_1", "a", learning=False), "card_arrival", ExampleSource.FRONTIER, model="m"),
            memory.record(task, job("job_2", "b", local_only=True), "card_arrival", ExampleSource.FEEDBACK,
                          model="feedback"),
            memory.record(task, job("job_3", "c"), "not_a_label", ExampleSource.FRONTIER, model="m")]
    # then
    assert kept == [None, None, None]
    assert memory.all(task) == []
    # and a task that allows local-only inputs keeps them
    allowing = learning_task(catalog, keep_local_only=True)
    assert memory.record(allowing, job("job_2", "b", local_only=True), "card_arrival", ExampleSource.FEEDBACK,
                         model="feedback") is not None


def test_a_correction_replaces_the_jobs_earlier_example(redis_url: str, catalog: Catalog) -> None:
    # given: the frontier's answer for a job
    memory = ExampleMemory(redis.Redis.from_url(redis_url))
    task = learning_task(catalog, max_examples_per_label=1)
    memory.record(task, job("job_1", "a"), "card_arrival", ExampleSource.FRONTIER, model="m")
    # when: a person corrects it
    memory.record(task, job("job_1", "a"), "exchange_rate", ExampleSource.FEEDBACK, model="feedback")
    # then: one example, the correction, counted under its new label only
    [example] = memory.all(task)
    assert (example.label, example.source) == ("exchange_rate", ExampleSource.FEEDBACK)
    assert memory.counts(task)["by_label"] == {"exchange_rate": 1}
    memory.record(task, job("job_2", "b"), "card_arrival", ExampleSource.FRONTIER, model="m")
    assert {e.job_id for e in memory.all(task)} == {"job_1", "job_2"}


def test_deleting_a_tenants_data_removes_its_examples_only(redis_url: str, catalog: Catalog) -> None:
    # given: examples of two tenants
    memory = ExampleMemory(redis.Redis.from_url(redis_url))
    task = learning_task(catalog)
    memory.record(task, job("job_1", "a", tenant="t1"), "card_arrival", ExampleSource.FRONTIER, model="m",
                  vector=b"\x00" * 8)
    memory.record(task, job("job_2", "b", tenant="t2"), "card_arrival", ExampleSource.FRONTIER, model="m")
    # when
    removed = memory.delete_tenant("t1")
    # then
    assert removed == 1
    assert [e.tenant for e in memory.all(task)] == ["t2"]
    assert memory.vectors(task, ["job_1"]) == [None]

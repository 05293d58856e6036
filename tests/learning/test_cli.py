"""`smallfirst examples export|delete-tenant` and `smallfirst model show` against a real Redis."""

from __future__ import annotations

import json
from pathlib import Path

import redis
from click.testing import CliRunner

from smallfirst.cli.main import cli
from smallfirst.common.catalog import Catalog
from smallfirst.common.examples import ExampleMemory, ExampleSource
from tests.learning.test_example_memory import job, learning_task


def test_the_export_round_trips_and_deleting_a_tenant_empties_it(redis_url: str, catalog: Catalog,
                                                                 catalog_path: Path, tmp_path: Path) -> None:
    # given: a catalog whose Banking77 task learns, and two examples of two tenants
    task = learning_task(catalog)
    memory = ExampleMemory(redis.Redis.from_url(redis_url))
    memory.record(task, job("job_1", "where is my card", tenant="t1"), "card_arrival", ExampleSource.FRONTIER,
                  model="claude-haiku-5-5")
    memory.record(task, job("job_2", "rates?", tenant="t2"), "exchange_rate", ExampleSource.FEEDBACK,
                  model="feedback")
    env = {"SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog_path)}
    runner = CliRunner()
    # when
    exported = runner.invoke(cli, ["examples", "export", task.name], env=env)
    # then: one JSON line per example, the same as the memory holds
    assert exported.exit_code == 0, exported.output
    lines = [json.loads(line) for line in exported.output.splitlines()]
    assert lines == list(memory.export(task))
    assert {(line["text"], line["answer"]["label"], line["source"]) for line in lines} == {
        ("where is my card", "card_arrival", "frontier"), ("rates?", "exchange_rate", "feedback")}
    # when: tenant t1's data is deleted
    deleted = runner.invoke(cli, ["examples", "delete-tenant", "t1"], env=env)
    # then
    assert json.loads(deleted.output) == {"tenant": "t1", "examples_removed": 1}
    assert [e.job_id for e in memory.all(task)] == ["job_2"]


def test_model_show_names_the_seed_scorer_before_any_head(redis_url: str, catalog_path: Path) -> None:
    env = {"SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog_path)}
    shown = CliRunner().invoke(cli, ["model", "show", "banking77_intent"], env=env)
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["scorer"] == "seed_nearest_neighbour"

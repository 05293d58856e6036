"""Shadow samples against the frontier simulator (real anthropic SDK) and a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import redis

from smallfirst.common import constants as k
from smallfirst.common.budgets import BudgetLedger
from smallfirst.common.catalog import Catalog
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import Tier
from smallfirst.common.pricing import load_price_table
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry
from smallfirst.frontier_worker.executor import FrontierExecutor
from smallfirst.frontier_worker.shadow import ShadowRunner
from tests.api import worker_sim
from tests.frontier_fixtures import SimControl
from tests.learning.test_example_memory import job, learning_task

TEXT = "my new card has still not arrived"


def runner(redis_url: str, catalog: Catalog, sim: SimControl) -> tuple[ShadowRunner, JobStore]:
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, retention_s=3600, stale_after_s=900)
    task = learning_task(catalog, shadow_rate=0.5)
    learning = Catalog({task.name: task}, ())
    executor = FrontierExecutor(anthropic.Anthropic(api_key="sk-test", base_url=sim.url, max_retries=0), None,
                                load_price_table())
    return ShadowRunner(store, learning, executor, client), store


def test_a_shadow_sample_is_answered_once_counted_and_kept(redis_url: str, catalog: Catalog, tmp_path: Path,
                                                           start_frontier_sim: Callable[..., SimControl]) -> None:
    # given: a frontier that knows the right label, and a job the small tier answered wrongly
    labels = tmp_path / "labels.csv"
    labels.write_text(f"text,label\n{TEXT},card_arrival\n")
    sim = start_frontier_sim(STRATEGY="oracle", LABELS_PATH=str(labels))
    shadow, store = runner(redis_url, catalog, sim)
    kept = job("job_s1", TEXT)
    store.create(kept)
    worker_sim.succeed(store, kept.id, tier=Tier.SMALL, answer={"label": "card_linking"})
    # when: its shadow sample runs, twice (a redelivered message)
    shadow.run(kept.id)
    shadow.run(kept.id)
    # then: one frontier call, counted as a disagreement for the small tier's label, billed as
    # shadow cost, and the frontier's answer is a shadow example
    assert sim.stats()["requests_total"] == 1
    fields = {key.decode(): value.decode() for key, value in
              redis.Redis.from_url(redis_url).hgetall(k.stats_key("t1", kept.task)).items()}
    assert (fields["shadow_samples"], fields["shadow_agree"], fields["shadow_label_samples:card_linking"]) == (
        "1", "0", "1")
    assert float(fields["shadow_cost_usd"]) > 0
    task = learning_task(catalog)
    example = ExampleMemory(redis.Redis.from_url(redis_url)).get(task, kept.id)
    assert example is not None
    assert (example.label, example.source) == ("card_arrival", ExampleSource.SHADOW)


def test_a_local_only_jobs_input_never_reaches_the_frontier_by_shadow(
        redis_url: str, catalog: Catalog, start_frontier_sim: Callable[..., SimControl]) -> None:
    # given: a local-only job the small tier kept (a stray shadow message for it)
    sim = start_frontier_sim()
    shadow, store = runner(redis_url, catalog, sim)
    private = job("job_p1", "my salary account number is 1234", local_only=True)
    store.create(private)
    worker_sim.succeed(store, private.id, tier=Tier.SMALL, answer={"label": "card_arrival"})
    # when
    shadow.run(private.id)
    # then: the simulator received nothing
    assert sim.stats()["requests_total"] == 0


def test_a_shadow_sample_counts_against_the_tenants_budget_and_none_runs_once_it_is_spent(
        redis_url: str, catalog: Catalog, start_frontier_sim: Callable[..., SimControl]) -> None:
    # given: tenant t1 with a daily frontier budget of a hundredth of a cent, and two jobs the small tier kept
    sim = start_frontier_sim()
    shadow, store = runner(redis_url, catalog, sim)
    client = redis.Redis.from_url(redis_url)
    TenantRegistry(client).create("t1", tenant_id="t1", limits={"budget_daily_usd": 0.0001})
    first, second = job("job_b1", TEXT), job("job_b2", TEXT)
    for kept in (first, second):
        store.create(kept)
        worker_sim.succeed(store, kept.id, tier=Tier.SMALL, answer={"label": "card_arrival"})
    # when: the first job's shadow sample runs (its cost spends the budget), then the second's
    shadow.run(first.id)
    state = BudgetLedger(client).state("t1", time.time())
    shadow.run(second.id)
    # then: the first call's cost is the tenant's spend, and the second sample made no call
    assert state is not None
    assert state.exceeded
    assert state.day.spent_usd > 0
    assert sim.stats()["requests_total"] == 1

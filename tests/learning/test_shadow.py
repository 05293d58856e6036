"""Shadow samples against the frontier simulator (real anthropic SDK) and a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.budgets import BudgetLedger
from smallfirst.common.catalog import Catalog
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import FrontierMode, Job, RouteDecision, RouteReason, Tier
from smallfirst.common.pricing import load_price_table
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry
from smallfirst.frontier_worker.batch_lane import BatchLane, BatchPolicy
from smallfirst.frontier_worker.batches import BatchBuffer, BatchConfig, BatchPoller, ResultHandler
from smallfirst.frontier_worker.executor import FrontierExecutor
from smallfirst.frontier_worker.shadow import ShadowRunner
from tests.api import worker_sim
from tests.frontier_fixtures import SimControl
from tests.learning.test_example_memory import job, learning_task
from tests.support.procs import wait_until

TEXT = "my new card has still not arrived"


BATCH_CONFIG = BatchConfig(max_requests=100, max_age_s=0.0, create_timeout_s=2.0, lock_ttl_s=3.0, clock_skew_s=30.0,
                           poll_lock_ttl_s=2.0, record_ttl_s=3600)


def runner(redis_url: str, catalog: Catalog, sim: SimControl) -> tuple[ShadowRunner, JobStore]:
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, retention_s=3600, stale_after_s=900)
    task = learning_task(catalog, shadow_rate=0.5)
    learning = Catalog({task.name: task}, ())
    executor = FrontierExecutor(anthropic.Anthropic(api_key="sk-test", base_url=sim.url, max_retries=0), None,
                                load_price_table())
    return ShadowRunner(store, learning, executor, client), store


def batching_runner(redis_url: str, catalog_path: Path, shadow: ShadowRunner, sim: SimControl) -> BatchLane:
    """`shadow` wired to a batch lane as the frontier pool wires them: it buffers, the lane hands back."""
    store = shadow.store
    celery = make_celery(CoreSettings(redis_url=redis_url, catalog_path=catalog_path))
    execution = JobExecution(store, Publisher(celery), shadow.catalog, lease_s=60, worker_name="test")
    sdk = anthropic.Anthropic(api_key="sk-test", base_url=sim.url, max_retries=0)

    def make_poller(handle: ResultHandler) -> BatchPoller:
        return BatchPoller(store.redis, sdk, handle, BATCH_CONFIG)

    lane = BatchLane(execution, BatchBuffer(store.redis, sdk, BATCH_CONFIG), load_price_table(),
                     BatchPolicy(lease_s=90_000, max_tries=2, min_time_left_s=0), make_poller=make_poller,
                     shadow_recorder=shadow.record)
    shadow.batches = lane.buffer
    return lane


def auto_job(job_id: str, text: str, tenant: str) -> Job:
    """A kept job whose frontier mode the task's `auto` resolved to realtime (normal priority)."""
    kept = job(job_id, text, tenant=tenant)
    return kept.model_copy(update={"route": RouteDecision(
        tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT, frontier_mode=FrontierMode.REALTIME,
        frontier_mode_source="task:auto:normal_priority")})


def stats_of(redis_url: str, tenant: str, task: str) -> dict[str, str]:
    return {key.decode(): value.decode() for key, value in
            redis.Redis.from_url(redis_url).hgetall(k.stats_key(tenant, task)).items()}


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


def test_a_shadow_sample_of_an_auto_mode_job_goes_out_in_a_batch_once_at_the_batch_price(
        redis_url: str, catalog: Catalog, catalog_path: Path, tmp_path: Path,
        start_frontier_sim: Callable[..., SimControl]) -> None:
    # given: an oracle frontier with batches that end at once; the same kept answer for two tenants:
    # one job in realtime mode (t1), one whose task said `auto` (t2); a shadow runner wired to a lane
    labels = tmp_path / "labels.csv"
    labels.write_text(f"text,label\n{TEXT},card_arrival\n")
    sim = start_frontier_sim(STRATEGY="oracle", LABELS_PATH=str(labels), BATCH_PROCESSING_S="0.5")
    shadow, store = runner(redis_url, catalog, sim)
    lane = batching_runner(redis_url, catalog_path, shadow, sim)
    TenantRegistry(store.redis).create("t2", tenant_id="t2", limits={"budget_daily_usd": 100.0})
    realtime, batched = job("job_r1", TEXT, tenant="t1"), auto_job("job_a1", TEXT, tenant="t2")
    for kept in (realtime, batched):
        store.create(kept)
        worker_sim.succeed(store, kept.id, tier=Tier.SMALL, answer={"label": "card_linking"})

    # when: both samples run, the batched one twice (a redelivered message), and the lane runs
    shadow.run(realtime.id)
    shadow.run(batched.id)
    shadow.run(batched.id)
    assert lane.buffer.pending() == 1
    wait_until(lambda: lane.run_once() is not None and "shadow_samples" in stats_of(redis_url, "t2", batched.task),
               30, "the batched shadow sample to be recorded", 0.2)

    # then: one realtime call (t1's) and one batch of one request (t2's), each counted once as a
    # disagreement; the batched sample cost half the realtime one, and spent the tenant's budget
    stats = sim.stats()
    assert stats["requests_total"] == 1
    assert stats["batches"]["created"] == 1
    t1, t2 = stats_of(redis_url, "t1", realtime.task), stats_of(redis_url, "t2", batched.task)
    assert (t2["shadow_samples"], t2["shadow_agree"], t2["shadow_label_samples:card_linking"]) == ("1", "0", "1")
    # (the batched request asks for a forced tool where the realtime call may use native output, so
    # their token counts differ by a few: half the price, not exactly half the cost)
    assert 0.4 < float(t2["shadow_cost_usd"]) / float(t1["shadow_cost_usd"]) < 0.6
    budget = BudgetLedger(redis.Redis.from_url(redis_url)).state("t2", time.time())
    assert budget is not None
    assert budget.day.spent_usd == pytest.approx(float(t2["shadow_cost_usd"]))
    # and its answer is a shadow example; the lane running again records nothing twice
    example = ExampleMemory(redis.Redis.from_url(redis_url)).get(learning_task(catalog), batched.id)
    assert example is not None
    assert (example.label, example.source) == ("card_arrival", ExampleSource.SHADOW)
    lane.run_once()
    assert stats_of(redis_url, "t2", batched.task)["shadow_samples"] == "1"

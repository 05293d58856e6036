"""Frontier spend budgets through the real pieces: the job store on a real Redis, the project's Celery
app publishing to it, `JobExecution` with the budget ledger (what both pools run), and the frontier
pool's runtime calling the simulator through the real `anthropic` SDK. The test plays the consumer,
taking each delivery as a worker would."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anthropic
import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from smallfirst.common import lifecycle
from smallfirst.common.budgets import CODE_BUDGET_EXCEEDED, BudgetLedger, BudgetMetrics
from smallfirst.common.catalog import Catalog
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import Job, JobStatus, Priority, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.common.metrics import JobMetrics
from smallfirst.common.outcome import AttemptResult, OutcomeKind
from smallfirst.common.pricing import load_price_table
from smallfirst.common.queues import Publisher
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry
from smallfirst.frontier_worker.executor import FrontierExecutor, RetryPolicy
from smallfirst.frontier_worker.worker import FrontierRuntime
from tests.frontier_fixtures import SimControl

TASK = "banking77_intent"
# Less than any frontier answer costs: one answered escalation spends it.
TINY_BUDGET_USD = 1e-9
REJECTED = AttemptResult(answer={"label": "lost card"}, confidence=0.2, usage=Usage(input_tokens=12),
                         verdict=Verdict(passed=False, reasons=["min_confidence: 0.2 is below 0.6"]))


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def tenants(client: redis.Redis) -> TenantRegistry:
    return TenantRegistry(client)


@pytest.fixture
def execution(client: redis.Redis, celery_app: Celery, catalog: Catalog) -> JobExecution:
    """What a worker pool runs for each delivery, with the tenants' budgets as an input."""
    registry = CollectorRegistry()
    return JobExecution(JobStore(client, retention_s=3600, stale_after_s=900), Publisher(celery_app), catalog,
                        lease_s=600, worker_name="test-worker", metrics=JobMetrics(registry),
                        budgets=BudgetLedger(client, BudgetMetrics(registry)))


@pytest.fixture
def frontier_runtime(execution: JobExecution, frontier_sim: SimControl) -> FrontierRuntime:
    """The frontier pool's runtime, calling the simulator through the SDK."""
    sdk = anthropic.Anthropic(api_key="sk-test", base_url=frontier_sim.url, max_retries=0)
    executor = FrontierExecutor(sdk, None, load_price_table(), RetryPolicy(max_attempts=2, max_wait_s=5.0))
    return FrontierRuntime(execution=execution, executor=executor)


def stored_job(store: JobStore, tenant: str, number: int, tier: Tier = Tier.SMALL) -> Job:
    now = time.time()
    job = Job(id=f"job_budget_{tenant}_{number}", tenant=tenant, task=TASK, input={"text": "Where is my new card?"},
              priority=Priority.NORMAL, route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT),
              created_at=now, updated_at=now, queued_at=now, deadline_at=now + 3600)
    store.create(job)
    return job


def small_attempt_rejected(execution: JobExecution, job: Job) -> OutcomeKind:
    """A small worker's delivery of `job` whose answer fails validation (a would-be escalation)."""
    ctx = execution.begin(job.id, Tier.SMALL, f"small-{job.id}")
    assert ctx is not None
    return execution.finish(ctx, REJECTED).kind


def spend_the_budget(execution: JobExecution, runtime: FrontierRuntime, tenant: str) -> None:
    """One escalation answered by the frontier: the tenant's spend passes TINY_BUDGET_USD."""
    job = stored_job(execution.store, tenant, 0)
    assert small_attempt_rejected(execution, job) is OutcomeKind.ESCALATE
    runtime.run(job.id, "frontier-spend")
    assert execution.store.get(job.id).status is JobStatus.SUCCEEDED


def test_past_its_budget_a_small_only_tenants_escalations_fail_and_the_frontier_is_not_called(
        tenants: TenantRegistry, execution: JobExecution, frontier_runtime: FrontierRuntime,
        frontier_sim: SimControl) -> None:
    # given a tenant with policy small_only that has spent its daily budget, and a tenant without one
    tenants.create("spender", tenant_id="spender", limits={"budget_daily_usd": TINY_BUDGET_USD,
                                                          "budget_policy": "small_only"})
    tenants.create("other", tenant_id="other")
    spend_the_budget(execution, frontier_runtime, "spender")
    calls_after_spending = len(frontier_sim.requests())
    assert calls_after_spending >= 1
    assert execution.budgets is not None
    state = execution.budgets.state("spender", time.time())
    assert state is not None
    assert state.exceeded

    # when its next small answers fail validation, a job of its routed to the frontier runs, and the
    # other tenant's answer fails validation too
    would_escalate = [stored_job(execution.store, "spender", n) for n in (1, 2)]
    kinds = [small_attempt_rejected(execution, job) for job in would_escalate]
    routed = stored_job(execution.store, "spender", 3, tier=Tier.FRONTIER)
    frontier_runtime.run(routed.id, "frontier-routed")
    other = stored_job(execution.store, "other", 1)
    other_kind = small_attempt_rejected(execution, other)
    calls_for_spender = len(frontier_sim.requests()) - calls_after_spending
    frontier_runtime.run(other.id, "frontier-other")

    # then the spender's would-be escalations and its frontier job fail with budget_exceeded, without
    # a call to the frontier, while the other tenant is escalated and answered by it
    assert kinds == [OutcomeKind.FAIL, OutcomeKind.FAIL]
    for job in [*would_escalate, routed]:
        stored = execution.store.get(job.id)
        assert stored.status is JobStatus.FAILED
        assert stored.error is not None
        assert stored.error.code == CODE_BUDGET_EXCEEDED
    assert calls_for_spender == 0
    assert other_kind is OutcomeKind.ESCALATE
    assert execution.store.get(other.id).status is JobStatus.SUCCEEDED
    assert len(frontier_sim.requests()) == calls_after_spending + 1


def test_past_its_budget_a_hold_tenants_escalation_waits_until_the_budget_is_raised(
        tenants: TenantRegistry, execution: JobExecution, frontier_runtime: FrontierRuntime,
        frontier_sim: SimControl) -> None:
    # given a tenant with policy hold that has spent its daily budget
    tenants.create("holder", tenant_id="holder", limits={"budget_daily_usd": TINY_BUDGET_USD,
                                                        "budget_policy": "hold"})
    spend_the_budget(execution, frontier_runtime, "holder")
    calls_after_spending = len(frontier_sim.requests())

    # when its next small answer fails validation and the frontier worker takes the escalation
    job = stored_job(execution.store, "holder", 1)
    kind = small_attempt_rejected(execution, job)
    frontier_runtime.run(job.id, "frontier-held")
    held = execution.store.get(job.id)

    # then the job is escalated but waits, with a retry time, and the frontier was not called
    assert kind is OutcomeKind.ESCALATE
    assert held.status is JobStatus.ESCALATED
    assert held.retry_at is not None
    assert held.retry_at > time.time()
    assert held.attempts[-1].error is not None
    assert held.attempts[-1].error.code == CODE_BUDGET_EXCEEDED
    assert len(frontier_sim.requests()) == calls_after_spending

    # when the operator raises the budget and the held job's next delivery comes
    tenants.update("holder", limits={"budget_daily_usd": 100.0})
    frontier_runtime.run(job.id, "frontier-after-raise")

    # then the frontier answers it
    assert execution.store.get(job.id).status is JobStatus.SUCCEEDED
    assert len(frontier_sim.requests()) == calls_after_spending + 1


def test_at_80_percent_a_tenant_is_warned_once_per_period(tenants: TenantRegistry, client: redis.Redis,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    # given a tenant with a daily budget of 1 USD that has spent 0.85 USD through a billed frontier attempt
    tenants.create("near", tenant_id="near", limits={"budget_daily_usd": 1.0})
    store = JobStore(client, retention_s=3600, stale_after_s=900)
    job = stored_job(store, "near", 1, tier=Tier.FRONTIER)
    _, running = store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.FRONTIER, model="m", worker="w", task_id="t", now=time.time(), lease_s=60))
    store.transition(job.id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=running.attempts[-1].number, task_id="t", now=time.time(), answer={"label": "x"},
        usage=Usage(input_tokens=10), cost_usd=0.85, verdict=Verdict(passed=True), billed=True)))
    registry = CollectorRegistry()
    ledger = BudgetLedger(client, BudgetMetrics(registry))

    # when two workers look at its budget after spending
    with caplog.at_level("WARNING", logger="smallfirst.common.budgets"):
        first = ledger.warn_if_near("near", time.time())
        second = ledger.warn_if_near("near", time.time())

    # then it is near, not over, and warned once: one log record, one count, the ratio as a gauge
    assert first is not None
    assert second is not None
    assert (first.status, first.exceeded) == ("warning", False)
    assert len([r for r in caplog.records if "frontier budget" in r.getMessage()]) == 1
    labels = {"tenant": "near", "period": "day"}
    assert registry.get_sample_value("smallfirst_tenant_budget_warnings_total", labels) == 1
    assert registry.get_sample_value("smallfirst_tenant_budget_used_ratio", labels) == 0.85

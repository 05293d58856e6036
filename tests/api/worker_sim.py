"""Play a worker: move a job through the lifecycle with the workers' own store and transitions.

No workers run in the API tests; these helpers make the same compare-and-set writes a worker
makes, so the API sees jobs end exactly as it would in production.
"""

from __future__ import annotations

import time

from smallfirst.common import lifecycle
from smallfirst.common.catalog import Catalog
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.jobs import ErrorInfo, Job, Tier, Usage, Verdict
from smallfirst.common.outcome import Application, AttemptResult, apply, decide
from smallfirst.common.store import JobStore

LEASE_S = 600


def begin(store: JobStore, job_id: str, tier: Tier, task_id: str = "delivery-1", model: str = "test-model") -> Job:
    _, job = store.transition(job_id, lambda j: lifecycle.begin_attempt(
        j, tier=tier, model=model, worker="test-worker", task_id=task_id, now=time.time(), lease_s=LEASE_S))
    return job


def succeed(store: JobStore, job_id: str, *, tier: Tier = Tier.SMALL, answer: object = None, cost_usd: float = 0.0,
            estimated_frontier_cost_usd: float | None = None, input_tokens: int = 10, output_tokens: int = 2) -> Job:
    """Run one attempt on `tier` and accept its answer."""
    job = begin(store, job_id, tier)
    number = job.attempts[-1].number
    task_id = job.attempts[-1].task_id
    _, job = store.transition(job_id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=number, task_id=task_id, now=time.time(), answer=answer, confidence=0.9,
        usage=Usage(input_tokens=input_tokens, output_tokens=output_tokens), cost_usd=cost_usd,
        verdict=Verdict(passed=True), estimated_frontier_cost_usd=estimated_frontier_cost_usd, billed=True)))
    return job


def escalate(store: JobStore, job_id: str, *, reasons: list[str], small_cost_usd: float = 0.0) -> Job:
    """Run a small-tier attempt whose answer fails validation and hand the job to the frontier tier."""
    job = begin(store, job_id, Tier.SMALL)
    number = job.attempts[-1].number
    task_id = job.attempts[-1].task_id
    _, job = store.transition(job_id, lambda j: lifecycle.escalate(j, lifecycle.AttemptEnd(
        attempt_number=number, task_id=task_id, now=time.time(), answer={"label": "x"},
        usage=Usage(input_tokens=10, output_tokens=2), cost_usd=small_cost_usd,
        verdict=Verdict(passed=False, reasons=reasons), billed=True), reasons=reasons))
    return job


def fail(store: JobStore, job_id: str, *, tier: Tier = Tier.SMALL, code: str = "validation_failed") -> Job:
    job = begin(store, job_id, tier)
    number = job.attempts[-1].number
    task_id = job.attempts[-1].task_id
    _, job = store.transition(job_id, lambda j: lifecycle.fail(j, lifecycle.AttemptEnd(
        attempt_number=number, task_id=task_id, now=time.time()),
        error=ErrorInfo(code=code, message="the answer failed validation")))
    return job


def fail_by_outcome(store: JobStore, catalog: Catalog, job_id: str, error: SmallfirstError,
                    tier: Tier = Tier.FRONTIER) -> Job:
    """Run one attempt that ends with `error`, decided and applied by the outcome function as a
    worker's `JobExecution.finish` does (so a failure a person can act on is dead-lettered)."""
    job = begin(store, job_id, tier)
    number = job.attempts[-1].number
    task_id = job.attempts[-1].task_id
    task = catalog.get(job.task)
    assert task is not None
    result = AttemptResult.failed(error)

    def change(j: Job) -> Job:
        now = time.time()
        decided = decide(j, task, tier, result, attempt_number=number, task_id=task_id, now=now)
        return apply(j, decided, result, attempt_number=number, task_id=task_id, now=now,
                     application=Application(worker="test-worker", model="test-model", lease_s=LEASE_S))

    _, job = store.transition(job_id, change)
    return job

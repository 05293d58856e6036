"""The outcome function, row by row: what the end of an attempt means for its job.

Pure: no Redis, no Celery, no clock. Each row gives a job as stored, the task's policy, the tier and
the attempt's result, and names the outcome and the record `apply` makes of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from smallfirst.common import lifecycle
from smallfirst.common.budgets import CODE_BUDGET_EXCEEDED, BudgetPolicy, BudgetState, budget_state
from smallfirst.common.catalog import Catalog, SmallUnavailablePolicy, Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.events import DeadLettered, Escalated, Replayed, stats_increments, transition_events
from smallfirst.common.execution import TaskNotInCatalog
from smallfirst.common.jobs import AttemptOutcome, Job, JobStatus, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.common.outcome import (
    CODE_DEADLINE_EXCEEDED,
    CODE_FRONTIER_REJECTED,
    CODE_VALIDATION_FAILED,
    RETRY_CAP_S,
    Application,
    AttemptResult,
    Outcome,
    OutcomeKind,
    apply,
    decide,
)
from smallfirst.frontier_worker.errors import (
    FrontierAuthError,
    FrontierBadRequest,
    FrontierBatchFailed,
    FrontierUnavailable,
)
from smallfirst.small_worker.executor import SmallTierTaskError
from smallfirst.small_worker.inference_client import (
    InferenceDeadlineExceeded,
    InferenceInputTooLong,
    InferenceUnavailable,
    UnknownModel,
)

NOW = 10_000.0
TASK_ID = "delivery-1"
APP = Application(worker="w", model="frontier-model", lease_s=60)

PASSED = AttemptResult(answer={"label": "card_arrival"}, confidence=0.9, usage=Usage(input_tokens=5),
                       verdict=Verdict(passed=True))
REJECTED = AttemptResult(answer={"label": "card_arrival"}, confidence=0.2, usage=Usage(input_tokens=5),
                         cost_usd=0.001, verdict=Verdict(passed=False, reasons=["min_confidence: 0.2 < 0.5"]))


@dataclass
class Given:
    tier: Tier
    result: AttemptResult
    local_only: bool = False
    deadline_in_s: float | None = None
    small_unavailable: SmallUnavailablePolicy = SmallUnavailablePolicy.ESCALATE
    max_validation_retries: int = 1
    # Frontier attempts already rejected by validation (each was a re-ask), and earlier retried ones.
    frontier_rejections: int = 0
    retried_before: int = 0
    escalated: bool = False  # the job reached the frontier by escalation from the small tier
    cancelled: bool = False
    budget: BudgetState | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def make_task(catalog: Catalog, given: Given) -> Task:
    task = catalog.get("banking77_intent")
    assert task is not None
    return task.model_copy(update={
        "routing": task.routing.model_copy(update={"local_only": given.local_only,
                                                   "small_unavailable": given.small_unavailable}),
        "frontier": task.frontier.model_copy(update={"max_validation_retries": given.max_validation_retries}),
    })


def make_job(given: Given) -> tuple[Job, int]:
    """A job whose open attempt on `given.tier` is attempt number N, as the store would hold it."""
    route_tier = Tier.SMALL if given.escalated or given.tier is Tier.SMALL else Tier.FRONTIER
    job = Job(id="job_1", tenant="t", task="banking77_intent", input={"text": "where is my card"},
              route=RouteDecision(tier=route_tier, reason=RouteReason.TASK_DEFAULT), created_at=NOW - 10,
              updated_at=NOW - 10, queued_at=NOW - 10,
              deadline_at=NOW + given.deadline_in_s if given.deadline_in_s is not None else None)

    def attempt(tier: Tier, task_id: str) -> None:
        nonlocal job
        job = lifecycle.begin_attempt(job, tier=tier, model="m", worker="w", task_id=task_id, now=NOW - 5,
                                      lease_s=60)

    if given.escalated:
        attempt(Tier.SMALL, "small-delivery")
        job = lifecycle.escalate(job, lifecycle.AttemptEnd(attempt_number=job.attempts[-1].number,
                                                           task_id="small-delivery", now=NOW - 4),
                                 reasons=["min_confidence: low"])
    for n in range(given.retried_before):
        attempt(given.tier, f"retried-{n}")
        job = lifecycle.retry_later(job, lifecycle.AttemptEnd(attempt_number=job.attempts[-1].number,
                                                              task_id=f"retried-{n}", now=NOW - 4), retry_at=NOW - 4)
    attempt(given.tier, TASK_ID)
    for _ in range(given.frontier_rejections):
        job = lifecycle.reask(job, lifecycle.AttemptEnd(attempt_number=job.attempts[-1].number, task_id=TASK_ID,
                                                        now=NOW - 3, verdict=Verdict(passed=False)),
                              model="m", worker="w", lease_s=60)
    number = job.attempts[-1].number
    if given.cancelled:
        job = lifecycle.cancel(job, now=NOW - 1)
    return job, number


def failed(error: SmallfirstError) -> AttemptResult:
    return AttemptResult.failed(error)


def budget(policy: BudgetPolicy, spent_usd: float, daily_usd: float = 10.0) -> BudgetState:
    """A tenant's budget state at NOW with `spent_usd` of a daily budget spent today."""
    return budget_state({"budget_policy": policy.value, "budget_daily_usd": daily_usd}, spent_usd, spent_usd, NOW)


SPENT_SMALL_ONLY = budget(BudgetPolicy.SMALL_ONLY, 10.0)
SPENT_HOLD = budget(BudgetPolicy.HOLD, 12.0)
SPENT_FAIL = budget(BudgetPolicy.FAIL, 10.5)
NEARLY_SPENT = budget(BudgetPolicy.SMALL_ONLY, 9.0)
REFUSED_BY_BUDGET = AttemptResult.failed(SPENT_HOLD.error())


# (name, given, expected outcome kind, expected job status after apply, expected error code)
ROWS: list[tuple[str, Given, OutcomeKind, JobStatus | None, str | None]] = [
    ("small answer passes: succeeded",
     Given(Tier.SMALL, PASSED), OutcomeKind.SUCCEED, JobStatus.SUCCEEDED, None),
    ("frontier answer passes: succeeded",
     Given(Tier.FRONTIER, PASSED, escalated=True), OutcomeKind.SUCCEED, JobStatus.SUCCEEDED, None),
    ("small answer rejected: escalated",
     Given(Tier.SMALL, REJECTED), OutcomeKind.ESCALATE, JobStatus.ESCALATED, None),
    ("small answer rejected, local-only: failed validation",
     Given(Tier.SMALL, REJECTED, local_only=True), OutcomeKind.FAIL, JobStatus.FAILED, CODE_VALIDATION_FAILED),
    ("frontier answer rejected, retries left: re-asked",
     Given(Tier.FRONTIER, REJECTED, max_validation_retries=1), OutcomeKind.REASK, JobStatus.RUNNING, None),
    ("frontier answer rejected, max_validation_retries used: failed",
     Given(Tier.FRONTIER, REJECTED, max_validation_retries=1, frontier_rejections=1), OutcomeKind.FAIL,
     JobStatus.FAILED, CODE_VALIDATION_FAILED),
    ("frontier answer rejected, max_validation_retries 0: failed at once",
     Given(Tier.FRONTIER, REJECTED, max_validation_retries=0), OutcomeKind.FAIL, JobStatus.FAILED,
     CODE_VALIDATION_FAILED),
    ("cancelled while running: stopped",
     Given(Tier.SMALL, PASSED, cancelled=True), OutcomeKind.STOP, None, None),
    ("cancelled while the frontier ran: stopped",
     Given(Tier.FRONTIER, PASSED, cancelled=True, escalated=True), OutcomeKind.STOP, None, None),
    ("small tier cannot fit the input: escalated",
     Given(Tier.SMALL, failed(InferenceInputTooLong("too long"))), OutcomeKind.ESCALATE, JobStatus.ESCALATED, None),
    ("small tier cannot fit the input, local-only: failed with its code",
     Given(Tier.SMALL, failed(InferenceInputTooLong("too long")), local_only=True), OutcomeKind.FAIL,
     JobStatus.FAILED, "inference_input_too_long"),
    ("small inference deadline: escalated",
     Given(Tier.SMALL, failed(InferenceDeadlineExceeded("slow"))), OutcomeKind.ESCALATE, JobStatus.ESCALATED, None),
    ("small tier down, policy escalate: escalated at once",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=600), OutcomeKind.ESCALATE,
     JobStatus.ESCALATED, None),
    ("small tier down, policy wait, deadline ahead: retried later",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=600,
           small_unavailable=SmallUnavailablePolicy.WAIT), OutcomeKind.RETRY, JobStatus.QUEUED, None),
    ("small tier down, policy wait, deadline passing: escalated",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=0.5,
           small_unavailable=SmallUnavailablePolicy.WAIT), OutcomeKind.ESCALATE, JobStatus.ESCALATED, None),
    ("small tier down, local-only, deadline ahead: retried later",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=600, local_only=True),
     OutcomeKind.RETRY, JobStatus.QUEUED, None),
    ("small tier down, local-only, deadline passed: deadline exceeded",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=0.5, local_only=True),
     OutcomeKind.FAIL, JobStatus.FAILED, CODE_DEADLINE_EXCEEDED),
    ("catalog mistake on the small tier: failed loudly, never escalated",
     Given(Tier.SMALL, failed(SmallTierTaskError("needs a generator"))), OutcomeKind.FAIL, JobStatus.FAILED,
     "small_tier_misconfigured"),
    ("model the deployment does not serve: failed loudly",
     Given(Tier.SMALL, failed(UnknownModel("no target"))), OutcomeKind.FAIL, JobStatus.FAILED,
     "inference_unknown_model"),
    ("task missing from the worker's catalog: failed loudly",
     Given(Tier.SMALL, failed(TaskNotInCatalog("no such task"))), OutcomeKind.FAIL, JobStatus.FAILED,
     "task_not_in_catalog"),
    ("frontier unavailable, deadline ahead: retried later, waiting for the frontier again",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=600, escalated=True),
     OutcomeKind.RETRY, JobStatus.ESCALATED, None),
    ("frontier unavailable on a frontier-routed job: retried later, queued",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=600), OutcomeKind.RETRY,
     JobStatus.QUEUED, None),
    ("frontier unavailable past the deadline: deadline exceeded",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=0.5), OutcomeKind.FAIL,
     JobStatus.FAILED, CODE_DEADLINE_EXCEEDED),
    ("frontier unavailable, job without a deadline: failed with the provider's code",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529"))), OutcomeKind.FAIL, JobStatus.FAILED,
     "frontier_unavailable"),
    ("frontier refuses the request: failed, not retried",
     Given(Tier.FRONTIER, failed(FrontierBadRequest("400")), deadline_in_s=600), OutcomeKind.FAIL,
     JobStatus.FAILED, "frontier_rejected"),
    ("batched request errored or expired, deadline ahead: retried later, queued",
     Given(Tier.FRONTIER, failed(FrontierBatchFailed("expired")), deadline_in_s=7200), OutcomeKind.RETRY,
     JobStatus.QUEUED, None),
    ("batched request errored or expired past the deadline: deadline exceeded",
     Given(Tier.FRONTIER, failed(FrontierBatchFailed("expired")), deadline_in_s=0.5), OutcomeKind.FAIL,
     JobStatus.FAILED, CODE_DEADLINE_EXCEEDED),
    ("frontier refuses the key: failed, not retried",
     Given(Tier.FRONTIER, failed(FrontierAuthError("401")), deadline_in_s=600), OutcomeKind.FAIL,
     JobStatus.FAILED, "frontier_auth_failed"),
    ("budget spent, small_only: a would-be escalation fails with budget_exceeded",
     Given(Tier.SMALL, REJECTED, deadline_in_s=3600, budget=SPENT_SMALL_ONLY), OutcomeKind.FAIL, JobStatus.FAILED,
     CODE_BUDGET_EXCEEDED),
    ("budget spent, fail: a would-be escalation fails with budget_exceeded",
     Given(Tier.SMALL, failed(InferenceInputTooLong("too long")), deadline_in_s=3600, budget=SPENT_FAIL),
     OutcomeKind.FAIL, JobStatus.FAILED, CODE_BUDGET_EXCEEDED),
    ("budget spent, hold, deadline ahead: escalated, delivered after the hold",
     Given(Tier.SMALL, REJECTED, deadline_in_s=3600, budget=SPENT_HOLD), OutcomeKind.ESCALATE, JobStatus.ESCALATED,
     None),
    ("budget spent, hold, deadline before the next look: failed with budget_exceeded",
     Given(Tier.SMALL, REJECTED, deadline_in_s=30, budget=SPENT_HOLD), OutcomeKind.FAIL, JobStatus.FAILED,
     CODE_BUDGET_EXCEEDED),
    ("budget at 90 %: escalated as usual",
     Given(Tier.SMALL, REJECTED, deadline_in_s=3600, budget=NEARLY_SPENT), OutcomeKind.ESCALATE,
     JobStatus.ESCALATED, None),
    ("budget spent: a small answer that passes still succeeds",
     Given(Tier.SMALL, PASSED, deadline_in_s=3600, budget=SPENT_SMALL_ONLY), OutcomeKind.SUCCEED,
     JobStatus.SUCCEEDED, None),
    ("budget spent, hold: the frontier attempt not made is retried later, still escalated",
     Given(Tier.FRONTIER, REFUSED_BY_BUDGET, deadline_in_s=3600, escalated=True, budget=SPENT_HOLD),
     OutcomeKind.RETRY, JobStatus.ESCALATED, None),
    ("budget spent, hold, frontier-routed job: retried later, queued",
     Given(Tier.FRONTIER, REFUSED_BY_BUDGET, deadline_in_s=3600, budget=SPENT_HOLD), OutcomeKind.RETRY,
     JobStatus.QUEUED, None),
    ("budget spent, small_only: the frontier attempt not made fails the job",
     Given(Tier.FRONTIER, REFUSED_BY_BUDGET, deadline_in_s=3600, escalated=True, budget=SPENT_SMALL_ONLY),
     OutcomeKind.FAIL, JobStatus.FAILED, CODE_BUDGET_EXCEEDED),
    ("budget spent, fail: no re-ask of a rejected frontier answer",
     Given(Tier.FRONTIER, REJECTED, deadline_in_s=3600, max_validation_retries=2, budget=SPENT_FAIL),
     OutcomeKind.FAIL, JobStatus.FAILED, CODE_BUDGET_EXCEEDED),
    ("budget spent: a cancelled job is still only stopped",
     Given(Tier.SMALL, REJECTED, cancelled=True, budget=SPENT_SMALL_ONLY), OutcomeKind.STOP, None, None),
]


@pytest.mark.parametrize(("name", "given", "kind", "status", "code"), ROWS, ids=[row[0] for row in ROWS])
def test_outcome_of_an_attempt(catalog: Catalog, name: str, given: Given, kind: OutcomeKind,
                               status: JobStatus | None, code: str | None) -> None:
    # given the job as stored, its task's policy and the attempt's result
    task = make_task(catalog, given)
    job, number = make_job(given)

    # when the outcome is decided and applied
    outcome = decide(job, task, given.tier, given.result, attempt_number=number, task_id=TASK_ID, now=NOW,
                     budget=given.budget)

    # then it is the row's outcome, and the record after it has the row's status and error
    assert outcome.kind is kind, name
    if kind is OutcomeKind.STOP:
        with pytest.raises(lifecycle.TransitionRefused):
            apply(job, outcome, given.result, attempt_number=number, task_id=TASK_ID, now=NOW, application=APP)
        return
    after = apply(job.model_copy(deep=True), outcome, given.result, attempt_number=number, task_id=TASK_ID,
                  now=NOW, application=APP)
    assert after.status is status
    assert (after.error.code if after.error is not None else None) == code
    if code is not None:
        assert outcome.error is not None
        assert outcome.error.code == code


def test_a_delivery_that_no_longer_owns_the_attempt_is_stopped(catalog: Catalog) -> None:
    # given a job whose open attempt belongs to another delivery
    given = Given(Tier.SMALL, PASSED)
    job, number = make_job(given)

    # when a stale delivery reports a result
    outcome = decide(job, make_task(catalog, given), Tier.SMALL, PASSED, attempt_number=number,
                     task_id="another-delivery", now=NOW)

    # then its result is dropped
    assert outcome.kind is OutcomeKind.STOP
    assert outcome.reasons == (lifecycle.REFUSED_NOT_OWNER,)


def test_a_reask_closes_the_rejected_answer_billed_and_opens_the_next_attempt(catalog: Catalog) -> None:
    # given a frontier answer that failed validation with a retry left
    given = Given(Tier.FRONTIER, REJECTED, max_validation_retries=2)
    job, number = make_job(given)
    outcome = decide(job, make_task(catalog, given), Tier.FRONTIER, REJECTED, attempt_number=number,
                     task_id=TASK_ID, now=NOW)

    # when it is applied
    after = apply(job, outcome, REJECTED, attempt_number=number, task_id=TASK_ID, now=NOW, application=APP)

    # then the rejected attempt is billed and the next one runs for the same delivery
    rejected, running = after.attempts[-2], after.attempts[-1]
    assert (rejected.outcome, rejected.billed, rejected.cost_usd) == (AttemptOutcome.REJECTED, True, 0.001)
    assert (running.outcome, running.task_id, running.model) == (AttemptOutcome.RUNNING, TASK_ID, "frontier-model")


def test_retries_back_off_exponentially_and_honour_the_providers_retry_after(catalog: Catalog) -> None:
    # given a frontier outage met for the fourth time, and one whose provider asks for 45 s
    task = make_task(catalog, Given(Tier.FRONTIER, PASSED))
    fourth, number = make_job(Given(Tier.FRONTIER, PASSED, deadline_in_s=3600, retried_before=3))
    first, first_number = make_job(Given(Tier.FRONTIER, PASSED, deadline_in_s=3600))

    # when their outcomes are decided
    backoff = decide(fourth, task, Tier.FRONTIER, failed(FrontierUnavailable("529")), attempt_number=number,
                     task_id=TASK_ID, now=NOW)
    hinted = decide(first, task, Tier.FRONTIER, failed(FrontierUnavailable("429", retry_after_s=45)),
                    attempt_number=first_number, task_id=TASK_ID, now=NOW)

    # then the delay doubles per earlier retry, within the cap, and never undercuts retry-after
    assert (backoff.kind, backoff.retry_in_s) == (OutcomeKind.RETRY, 8.0)
    assert (hinted.kind, hinted.retry_in_s) == (OutcomeKind.RETRY, 45.0)
    assert backoff.retry_in_s <= RETRY_CAP_S


def test_a_retried_attempt_is_not_billed_and_the_job_is_due_after_the_backoff(catalog: Catalog) -> None:
    # given a frontier outage within the deadline
    given = Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=600, escalated=True)
    job, number = make_job(given)
    outcome = decide(job, make_task(catalog, given), Tier.FRONTIER, given.result, attempt_number=number,
                     task_id=TASK_ID, now=NOW)

    # when it is applied
    after = apply(job, outcome, given.result, attempt_number=number, task_id=TASK_ID, now=NOW, application=APP)

    # then the attempt is closed unbilled with the provider's code, and the job waits for its retry time
    attempt = after.attempts[-1]
    assert (attempt.outcome, attempt.billed) == (AttemptOutcome.RETRIED, False)
    assert attempt.error is not None
    assert attempt.error.code == "frontier_unavailable"
    assert after.retry_at == NOW + outcome.retry_in_s
    # and the job escalated once: waiting for the frontier again is no second escalation
    assert not [e for e in transition_events(job, after) if isinstance(e, Escalated)]


def test_an_attempt_result_has_either_a_verdict_or_an_error() -> None:
    with pytest.raises(ValueError, match="either a verdict or an error"):
        AttemptResult(answer="x")
    with pytest.raises(ValueError, match="either a verdict or an error"):
        AttemptResult(verdict=Verdict(passed=True), error=FrontierUnavailable("x"))


# (name, tier, task learns, job learning flag, job local-only, task keeps local-only, expected learn)
LEARN_ROWS: list[tuple[str, Tier, bool, bool, bool, bool, bool]] = [
    ("frontier answer of a task that learns: learned", Tier.FRONTIER, True, True, False, False, True),
    ("small answer: never learned (it is the student's own)", Tier.SMALL, True, True, False, False, False),
    ("task that does not learn: not learned", Tier.FRONTIER, False, True, False, False, False),
    ("job (or its tenant) opted out: not learned", Tier.FRONTIER, True, False, False, False, False),
    ("local-only input, task does not keep those: not learned", Tier.FRONTIER, True, True, True, False, False),
    ("local-only input, task keeps those: learned", Tier.FRONTIER, True, True, True, True, True),
]


@pytest.mark.parametrize(("name", "tier", "task_learns", "job_learning", "local_only", "keep_local", "learn"),
                         LEARN_ROWS, ids=[row[0] for row in LEARN_ROWS])
def test_which_accepted_answers_become_training_examples(catalog: Catalog, name: str, tier: Tier, task_learns: bool,
                                                         job_learning: bool, local_only: bool, keep_local: bool,
                                                         learn: bool) -> None:
    # given: a passing answer on `tier`, the task's learning policy and the job's opt-out
    task = make_task(catalog, Given(tier, PASSED))
    task = task.model_copy(update={"learning": task.learning.model_copy(
        update={"enabled": task_learns, "keep_local_only": keep_local})})
    job, number = make_job(Given(tier, PASSED, escalated=tier is Tier.FRONTIER))
    job = job.model_copy(update={"learning": job_learning, "local_only": local_only})
    # when
    outcome = decide(job, task, tier, PASSED, attempt_number=number, task_id=TASK_ID, now=NOW)
    # then
    assert outcome.kind is OutcomeKind.SUCCEED
    assert outcome.learn is learn, name


# (name, shadow rate, job local-only, job learning flag, tier, expected share of 400 jobs drawn)
SHADOW_ROWS: list[tuple[str, float, bool, bool, Tier, tuple[float, float]]] = [
    ("kept small answers of a task with shadow_rate 0.25: about a quarter drawn", 0.25, False, True, Tier.SMALL,
     (0.18, 0.32)),
    ("shadow_rate 0: none drawn", 0.0, False, True, Tier.SMALL, (0.0, 0.0)),
    ("local-only jobs: never drawn (their input never reaches the frontier)", 1.0, True, True, Tier.SMALL, (0.0, 0.0)),
    ("jobs that opted out of learning: never drawn", 1.0, False, False, Tier.SMALL, (0.0, 0.0)),
    ("frontier answers: never drawn (they are the frontier's already)", 1.0, False, True, Tier.FRONTIER, (0.0, 0.0)),
]


@pytest.mark.parametrize(("name", "rate", "local_only", "job_learning", "tier", "share"), SHADOW_ROWS,
                         ids=[row[0] for row in SHADOW_ROWS])
def test_which_kept_answers_are_shadow_sampled(catalog: Catalog, name: str, rate: float, local_only: bool,
                                               job_learning: bool, tier: Tier, share: tuple[float, float]) -> None:
    # given: a task that learns with a shadow rate, and 400 jobs whose answer passed
    task = make_task(catalog, Given(tier, PASSED))
    task = task.model_copy(update={"learning": task.learning.model_copy(update={"enabled": True,
                                                                                "shadow_rate": rate})})
    drawn = 0
    for i in range(400):
        job, number = make_job(Given(tier, PASSED, escalated=tier is Tier.FRONTIER))
        job = job.model_copy(update={"id": f"job_{i}", "local_only": local_only, "learning": job_learning})
        # when
        outcome = decide(job, task, tier, PASSED, attempt_number=number, task_id=TASK_ID, now=NOW)
        again = decide(job, task, tier, PASSED, attempt_number=number, task_id=TASK_ID, now=NOW)
        # then: the same job always draws the same
        assert outcome.shadow is again.shadow
        drawn += outcome.shadow
    assert share[0] <= drawn / 400 <= share[1], name
def test_a_held_escalation_waits_until_the_budget_is_looked_at_again(catalog: Catalog) -> None:
    # given a tenant past its daily budget with policy hold, and a small answer that fails validation
    given = Given(Tier.SMALL, REJECTED, deadline_in_s=24 * 3600, budget=SPENT_HOLD)
    job, number = make_job(given)

    # when its outcome is decided
    outcome = decide(job, make_task(catalog, given), Tier.SMALL, REJECTED, attempt_number=number, task_id=TASK_ID,
                     now=NOW, budget=SPENT_HOLD)

    # then it escalates, delivered once the period resets or the recheck interval passed, whichever is first
    assert outcome.kind is OutcomeKind.ESCALATE
    assert outcome.retry_in_s == min(SPENT_HOLD.resets_at - NOW, 600.0)
    assert outcome.retry_in_s > 0


# (name, given, the dead-letter reason the failure carries, or None when it does not dead-letter)
DEAD_LETTER_ROWS: list[tuple[str, Given, str | None]] = [
    ("frontier down past the deadline: dead-lettered as deadline_exceeded",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=0.5), CODE_DEADLINE_EXCEEDED),
    ("small tier down past the deadline, local-only: dead-lettered as deadline_exceeded",
     Given(Tier.SMALL, failed(InferenceUnavailable("down")), deadline_in_s=0.5, local_only=True),
     CODE_DEADLINE_EXCEEDED),
    ("frontier refuses the request: dead-lettered as frontier_rejected",
     Given(Tier.FRONTIER, failed(FrontierBadRequest("400")), deadline_in_s=600), CODE_FRONTIER_REJECTED),
    ("frontier answer rejected after every re-ask: dead-lettered as validation_failed",
     Given(Tier.FRONTIER, REJECTED, max_validation_retries=1, frontier_rejections=1), CODE_VALIDATION_FAILED),
    ("small answer rejected, local-only: dead-lettered as validation_failed",
     Given(Tier.SMALL, REJECTED, local_only=True), CODE_VALIDATION_FAILED),
    ("the tenant's frontier budget is spent: dead-lettered as budget_exceeded",
     Given(Tier.FRONTIER, failed(SmallfirstError("budget spent", code=CODE_BUDGET_EXCEEDED)), deadline_in_s=600),
     CODE_BUDGET_EXCEEDED),
    ("budget spent, small_only, small answer rejected: the would-be escalation dead-letters as budget_exceeded",
     Given(Tier.SMALL, REJECTED, budget=SPENT_SMALL_ONLY), CODE_BUDGET_EXCEEDED),
    ("budget spent, fail, frontier call refused by the worker: dead-lettered as budget_exceeded",
     Given(Tier.FRONTIER, REFUSED_BY_BUDGET, deadline_in_s=600, budget=SPENT_FAIL), CODE_BUDGET_EXCEEDED),
    ("budget spent, hold, escalation held: not dead-lettered",
     Given(Tier.SMALL, REJECTED, deadline_in_s=24 * 3600, budget=SPENT_HOLD), None),
    ("frontier refuses the key: failed, not dead-lettered (an operator fixes the deployment)",
     Given(Tier.FRONTIER, failed(FrontierAuthError("401")), deadline_in_s=600), None),
    ("catalog mistake: failed, not dead-lettered",
     Given(Tier.SMALL, failed(SmallTierTaskError("needs a generator"))), None),
    ("frontier down, job without a deadline: failed, not dead-lettered",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529"))), None),
    ("answer passes: succeeded, not dead-lettered",
     Given(Tier.SMALL, PASSED), None),
    ("frontier down, deadline ahead: retried, not dead-lettered",
     Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=600), None),
]


@pytest.mark.parametrize(("name", "given", "reason"), DEAD_LETTER_ROWS, ids=[row[0] for row in DEAD_LETTER_ROWS])
def test_a_failure_a_person_can_act_on_dead_letters_its_job(catalog: Catalog, name: str, given: Given,
                                                            reason: str | None) -> None:
    # given the job as stored and the attempt's result
    task = make_task(catalog, given)
    job, number = make_job(given)

    # when the outcome is decided and applied
    outcome = decide(job, task, given.tier, given.result, attempt_number=number, task_id=TASK_ID, now=NOW,
                     budget=given.budget)
    after = apply(job.model_copy(deep=True), outcome, given.result, attempt_number=number, task_id=TASK_ID,
                  now=NOW, application=APP)

    # then the outcome names the dead-letter reason (a FAIL only) and the record carries it
    assert outcome.dead_letter == reason, name
    assert after.dead_letter == reason
    if reason is not None:
        assert outcome.kind is OutcomeKind.FAIL
        assert after.status is JobStatus.FAILED
        assert [e for e in transition_events(job, after) if isinstance(e, DeadLettered)] == [DeadLettered(reason)]


def test_only_a_failure_can_dead_letter() -> None:
    # given / when / then: an outcome other than FAIL that names a dead-letter reason is refused
    with pytest.raises(ValueError, match="only a FAIL"):
        Outcome(OutcomeKind.SUCCEED, dead_letter=CODE_DEADLINE_EXCEEDED)


def dead_lettered_job(catalog: Catalog, given: Given) -> Job:
    task = make_task(catalog, given)
    job, number = make_job(given)
    outcome = decide(job, task, given.tier, given.result, attempt_number=number, task_id=TASK_ID, now=NOW)
    return apply(job, outcome, given.result, attempt_number=number, task_id=TASK_ID, now=NOW, application=APP)


def test_a_replay_runs_the_job_again_with_its_history_and_a_fresh_deadline(catalog: Catalog) -> None:
    # given a frontier-routed job dead-lettered after its deadline passed during an outage
    failed_job = dead_lettered_job(catalog, Given(Tier.FRONTIER, failed(FrontierUnavailable("529")), deadline_in_s=0.5))
    history = [a.model_copy() for a in failed_job.attempts]

    # when it is replayed
    replayed = lifecycle.replay(failed_job.model_copy(deep=True), now=NOW + 100, deadline_s=300)

    # then it waits for the frontier again, out of the dead letters, with its attempts kept
    assert replayed.status is JobStatus.QUEUED
    assert replayed.dead_letter is None
    assert replayed.error is None
    assert replayed.ended_at is None
    assert replayed.attempts == history
    assert replayed.deadline_at == NOW + 400
    assert replayed.replays == 1
    assert replayed.attempts_since_replay() == []
    events = transition_events(failed_job, replayed)
    assert Replayed(reason=CODE_DEADLINE_EXCEEDED, error_code=CODE_DEADLINE_EXCEEDED) in events
    # and its earlier end is taken back from the stats, so the job counts as ended once in the end
    fields = stats_increments(events)
    assert fields["jobs_ended"] == -1
    assert fields["status:failed"] == -1
    assert fields["replayed"] == 1


def test_a_replayed_escalated_job_waits_for_the_frontier_and_may_be_reasked_again(catalog: Catalog) -> None:
    # given an escalated job whose frontier answers failed validation after every re-ask
    given = Given(Tier.FRONTIER, REJECTED, max_validation_retries=1, frontier_rejections=1, escalated=True)
    failed_job = dead_lettered_job(catalog, given)
    assert failed_job.dead_letter == CODE_VALIDATION_FAILED

    # when it is replayed and its next frontier answer is rejected once more
    replayed = lifecycle.replay(failed_job, now=NOW + 100, deadline_s=300)
    assert replayed.status is JobStatus.ESCALATED
    running = lifecycle.begin_attempt(replayed, tier=Tier.FRONTIER, model="m", worker="w", task_id="replay-1",
                                      now=NOW + 101, lease_s=60)
    outcome = decide(running, make_task(catalog, given), Tier.FRONTIER, REJECTED,
                     attempt_number=running.attempts[-1].number, task_id="replay-1", now=NOW + 102)

    # then the re-asks of the earlier run do not count against the new one
    assert outcome.kind is OutcomeKind.REASK


def test_only_a_dead_lettered_job_can_be_replayed(catalog: Catalog) -> None:
    # given a job that failed for a reason no replay can fix (a refused API key)
    failed_job = dead_lettered_job(catalog, Given(Tier.FRONTIER, failed(FrontierAuthError("401")), deadline_in_s=600))
    assert failed_job.status is JobStatus.FAILED
    assert failed_job.dead_letter is None

    # when / then
    with pytest.raises(lifecycle.TransitionRefused, match=lifecycle.REFUSED_NOT_DEAD_LETTERED):
        lifecycle.replay(failed_job, now=NOW + 1, deadline_s=300)


def test_only_a_success_is_learned_from_or_shadow_sampled() -> None:
    # given / when / then: an outcome other than SUCCEED that is marked for learning or a shadow sample is refused
    with pytest.raises(ValueError, match="only a SUCCEED"):
        Outcome(OutcomeKind.ESCALATE, learn=True)
    with pytest.raises(ValueError, match="only a SUCCEED"):
        Outcome(OutcomeKind.FAIL, shadow=True)

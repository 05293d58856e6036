"""The rule of the product in one place: what the end of an attempt means for its job.

An executor (small tier or frontier) returns an `AttemptResult`: an answer with its validation
verdict, or a typed error (`smallfirst.common.errors`). `decide` turns the job as it is stored now,
its task, the tier and that result into an `Outcome`:

    STOP      the job was cancelled (or another delivery owns it): drop the result
    SUCCEED   the answer passed validation: it becomes the job's result
    ESCALATE  the small tier's answer failed validation, or the small tier could not answer:
              hand the job to the frontier tier
    REASK     the frontier's answer failed validation and the task allows another try
    RETRY     the infrastructure failed: the same tier tries again after a backoff, within the
              job's deadline
    FAIL      nothing more can be done: the job fails with a machine-readable code; when a person
              can act on the reason (`DEAD_LETTER_REASONS`), the outcome names it in `dead_letter`
              and the store puts the job into its tenant's dead letters in the same transaction

`decide` is pure: no Redis, no Celery, no clock (time is an argument). It runs inside the store's
compare-and-set on the freshest record, so a cancel that lands while an attempt runs is seen.
`apply` (also pure) turns an outcome into the next job record; `JobExecution.finish` is the one
place that runs both and publishes what follows (an escalation, a retry, a webhook).

The chain, in order: the deciding rules (`RULES`: stop_unless_owned, on_error, on_passed, and
on_rejected for what is left); the first one that decides wins. Then the refinements
(`REFINEMENTS`), each given the outcome so far: within_budget (a spent frontier budget holds or
fails what would call the frontier), then with_learning (a frontier success becomes a training
example, a small success may be drawn as a shadow sample). A new feature becomes a rule or an input
here (a learned confidence threshold feeds the verdict), never a branch elsewhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from smallfirst.common import lifecycle
from smallfirst.common.budgets import CODE_BUDGET_EXCEEDED, BudgetPolicy, BudgetState
from smallfirst.common.catalog import SmallUnavailablePolicy, Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.examples import learns_from
from smallfirst.common.jobs import AttemptOutcome, ErrorInfo, Job, JobStatus, Tier, Usage, Verdict

# Codes of the failures the outcome function itself gives a job.
CODE_VALIDATION_FAILED = "validation_failed"
CODE_DEADLINE_EXCEEDED = "deadline_exceeded"
# Codes other parts give a job's failure that the outcome function routes to the dead letters:
# the frontier refused the request as malformed, the tenant's frontier budget is spent (that code
# is budgets.CODE_BUDGET_EXCEEDED, imported above).
CODE_FRONTIER_REJECTED = "frontier_rejected"

# Failures a person can act on (raise the deadline, fix the prompt or the task, raise the budget,
# wait out the outage) and then replay: these land in the tenant's dead letters.
DEAD_LETTER_REASONS: frozenset[str] = frozenset({
    CODE_DEADLINE_EXCEEDED, CODE_FRONTIER_REJECTED, CODE_BUDGET_EXCEEDED, CODE_VALIDATION_FAILED})

# Backoff of infrastructure retries: base * 2^n, capped; a provider's retry-after is honoured.
RETRY_BASE_S = 1.0
RETRY_CAP_S = 60.0

# The prefix of an escalation reason that is a small-tier error, not a validation failure.
SMALL_TIER_ERROR_REASON = "small_tier_error"


class OutcomeKind(StrEnum):
    STOP = "stop"
    SUCCEED = "succeed"
    ESCALATE = "escalate"
    REASK = "reask"
    RETRY = "retry"
    FAIL = "fail"


@dataclass(frozen=True)
class AttemptResult:
    """What one attempt produced: an answer (with the verdict on it) or a typed error.

    `usage` is None when no model ran (nothing to bill); a small-tier answer costs nothing but
    carries the estimate of what the frontier would have charged for it.
    """

    answer: Any = None
    confidence: float | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    estimated_frontier_cost_usd: float | None = None
    verdict: Verdict | None = None
    error: SmallfirstError | None = None

    @classmethod
    def failed(cls, error: SmallfirstError) -> AttemptResult:
        return cls(error=error)

    def __post_init__(self) -> None:
        if (self.error is None) == (self.verdict is None):
            raise ValueError("an attempt result has either a verdict or an error, not both or neither")


@dataclass(frozen=True)
class Outcome:
    kind: OutcomeKind
    # Why, in words a log or a metric can carry: a refused-transition reason for STOP, the
    # escalation reasons for ESCALATE, the rule that decided otherwise.
    reasons: tuple[str, ...] = ()
    error: ErrorInfo | None = None
    # Whether the attempt's tokens are billed (an answer was produced, whatever became of it).
    billed: bool = False
    retry_in_s: float = 0.0
    # FAIL only: the reason code under which the job goes to the dead letters (None: it does not).
    dead_letter: str | None = None
    # A SUCCEED whose answer becomes a training example of the task (a frontier answer the task
    # may learn from: see smallfirst.common.examples.learns_from).
    learn: bool = False
    # A SUCCEED on the small tier that the frontier also answers in the background (shadow sample).
    shadow: bool = False

    def __post_init__(self) -> None:
        if self.dead_letter is not None and self.kind is not OutcomeKind.FAIL:
            raise ValueError("only a FAIL outcome dead-letters its job")
        if (self.learn or self.shadow) and self.kind is not OutcomeKind.SUCCEED:
            raise ValueError("only a SUCCEED outcome is learned from or shadow-sampled")


@dataclass(frozen=True)
class Decision:
    """Everything `decide` looks at. `job` is the stored record, fresh from the compare-and-set."""

    job: Job
    task: Task
    tier: Tier
    result: AttemptResult
    attempt_number: int
    task_id: str
    now: float
    # The tenant's frontier budget as read just before the transition (None: no budget).
    budget: BudgetState | None = None

    @property
    def local_only(self) -> bool:
        return self.job.local_only or self.task.routing.local_only

    @property
    def answered(self) -> bool:
        return self.result.error is None


Rule = Callable[[Decision], Outcome | None]


def failure(error: ErrorInfo, *, billed: bool = False, reasons: tuple[str, ...] = ()) -> Outcome:
    """A FAIL outcome with `error`, dead-lettered when a person can act on its code."""
    return Outcome(OutcomeKind.FAIL, reasons=reasons, error=error, billed=billed,
                   dead_letter=error.code if error.code in DEAD_LETTER_REASONS else None)


# ---- the rules, in order -----------------------------------------------------------------------
def stop_unless_owned(d: Decision) -> Outcome | None:
    """A cancelled job, or an attempt another delivery took over, takes no result."""
    if d.job.status.terminal:
        return Outcome(OutcomeKind.STOP, reasons=(lifecycle.REFUSED_TERMINAL,))
    attempt = d.job.open_attempt()
    if (d.job.status is not JobStatus.RUNNING or attempt is None or attempt.number != d.attempt_number
            or attempt.task_id != d.task_id or attempt.tier is not d.tier):
        return Outcome(OutcomeKind.STOP, reasons=(lifecycle.REFUSED_NOT_OWNER,))
    return None


def on_error(d: Decision) -> Outcome | None:
    """No answer: wait and retry, hand over to the frontier, or fail, as the error allows."""
    error = d.result.error
    if error is None:
        return None
    can_escalate = d.tier is Tier.SMALL and error.escalatable and not d.local_only
    # A dependency that is down: wait for it, unless the task prefers the frontier meanwhile.
    wait_first = d.task.routing.small_unavailable is SmallUnavailablePolicy.WAIT or not can_escalate
    if error.retryable and wait_first:
        delay_s = retry_delay_s(d.job, d.tier, error)
        if d.job.deadline_at is not None and d.now + delay_s < d.job.deadline_at:
            return Outcome(OutcomeKind.RETRY, reasons=(error.code,), retry_in_s=delay_s)
        if not can_escalate:
            if d.job.deadline_at is None:
                return failure(error.info())
            return failure(ErrorInfo(
                code=CODE_DEADLINE_EXCEEDED,
                message=f"the job's deadline passed while {d.tier.value}-tier attempts kept failing ({error.code})",
                details={"last_error": error.code}))
    if can_escalate:
        return Outcome(OutcomeKind.ESCALATE, reasons=(f"{SMALL_TIER_ERROR_REASON}: {error.code}: {error.message}",))
    return failure(error.info())


def on_passed(d: Decision) -> Outcome | None:
    verdict = d.result.verdict
    if verdict is not None and verdict.passed:
        return Outcome(OutcomeKind.SUCCEED, billed=True)
    return None


def on_rejected(d: Decision) -> Outcome:
    """The answer failed validation (the only case left once the rules above passed on it)."""
    reasons = tuple(d.result.verdict.reasons) if d.result.verdict is not None else ()
    if d.tier is Tier.SMALL:
        if d.local_only:
            return failure(ErrorInfo(
                code=CODE_VALIDATION_FAILED,
                message="the small tier's answer failed validation and the job is local-only",
                details={"reasons": list(reasons)}), billed=True, reasons=reasons)
        return Outcome(OutcomeKind.ESCALATE, billed=True, reasons=reasons)
    if frontier_rejections(d.job) < d.task.frontier.max_validation_retries:
        return Outcome(OutcomeKind.REASK, billed=True, reasons=reasons)
    return failure(ErrorInfo(
        code=CODE_VALIDATION_FAILED, message="the frontier answer failed validation after every retry",
        details={"reasons": list(reasons)}), billed=True, reasons=reasons)


RULES: tuple[Rule, ...] = (stop_unless_owned, on_error, on_passed)


def within_budget(d: Decision, outcome: Outcome) -> Outcome:
    """A tenant past its frontier budget: an outcome that would call the frontier (an escalation, a
    re-ask, or a frontier attempt the worker did not make because of the budget) follows the
    tenant's policy. `hold`: the escalation is delivered later, a frontier attempt retried later,
    while the deadline allows; `small_only` and `fail`: the job fails with `budget_exceeded`."""
    budget = d.budget
    if budget is None or not budget.exceeded:
        return outcome
    refused_call = (d.tier is Tier.FRONTIER and d.result.error is not None
                    and d.result.error.code == CODE_BUDGET_EXCEEDED)
    if outcome.kind not in (OutcomeKind.ESCALATE, OutcomeKind.REASK) and not refused_call:
        return outcome
    if budget.policy is BudgetPolicy.HOLD:
        wait_s = budget.hold_s(d.now)
        if d.job.deadline_at is None or d.now + wait_s < d.job.deadline_at:
            if outcome.kind is OutcomeKind.ESCALATE:
                return Outcome(OutcomeKind.ESCALATE, reasons=outcome.reasons, billed=outcome.billed,
                               retry_in_s=wait_s)
            return Outcome(OutcomeKind.RETRY, reasons=(CODE_BUDGET_EXCEEDED,), billed=outcome.billed,
                           retry_in_s=wait_s)
    error = budget.error()
    if budget.policy is BudgetPolicy.HOLD:
        error.message += "; the job's deadline comes before the budget resets"
    # failure(): budget_exceeded is a dead-letter reason (raise the budget, then replay).
    return failure(error.info(), billed=outcome.billed, reasons=outcome.reasons)


def shadow_sampled(d: Decision) -> bool:
    """Whether a kept small answer is drawn for a shadow check: never for a local-only job (its
    input never reaches the frontier) nor one that opted out of learning. The draw is a hash of
    the job id, so every delivery of a job draws the same."""
    rate = d.task.learning.shadow_rate
    if rate <= 0 or not d.task.learns or d.local_only or not d.job.learning:
        return False
    digest = hashlib.sha256(d.job.id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def with_learning(d: Decision, outcome: Outcome) -> Outcome:
    """A success the task learns from: a frontier answer becomes a training example; a small answer
    may be drawn as a shadow sample (the shadow runner skips it while the tenant's frontier budget
    is spent: a passing small answer reads no budget here)."""
    if outcome.kind is not OutcomeKind.SUCCEED:
        return outcome
    learn = d.tier is Tier.FRONTIER and learns_from(d.job, d.task)
    shadow = d.tier is Tier.SMALL and shadow_sampled(d)
    if not learn and not shadow:
        return outcome
    return replace(outcome, learn=learn, shadow=shadow)


# Rules that refine the outcome the first deciding rule gave, in order.
REFINEMENTS: tuple[Callable[[Decision, Outcome], Outcome], ...] = (within_budget, with_learning)


def decide(job: Job, task: Task, tier: Tier, result: AttemptResult, *, attempt_number: int, task_id: str,
           now: float, rules: Sequence[Rule] = RULES, budget: BudgetState | None = None) -> Outcome:
    decision = Decision(job=job, task=task, tier=tier, result=result, attempt_number=attempt_number,
                        task_id=task_id, now=now, budget=budget)
    outcome = next((o for o in (rule(decision) for rule in rules) if o is not None), None)
    if outcome is None:
        outcome = on_rejected(decision)
    if outcome.kind is OutcomeKind.STOP:
        return outcome
    for refine in REFINEMENTS:
        outcome = refine(decision, outcome)
    return outcome


# ---- inputs derived from the job ---------------------------------------------------------------
def frontier_rejections(job: Job) -> int:
    """Frontier answers of this job's current run (since its last replay) already rejected by
    validation (each one was a re-ask)."""
    return sum(1 for a in job.attempts_since_replay()
               if a.tier is Tier.FRONTIER and a.outcome is AttemptOutcome.REJECTED)


def infrastructure_failures(job: Job, tier: Tier) -> int:
    """Attempts on `tier` of the current run that ended without an answer because a dependency
    failed (retried)."""
    return sum(1 for a in job.attempts_since_replay() if a.tier is tier and a.outcome is AttemptOutcome.RETRIED)


def retry_delay_s(job: Job, tier: Tier, error: SmallfirstError) -> float:
    delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** infrastructure_failures(job, tier))
    return max(delay, error.retry_after_s or 0.0)


# ---- applying an outcome -----------------------------------------------------------------------
@dataclass(frozen=True)
class Application:
    """What `apply` needs beyond the decision: who runs the next attempt of a re-ask."""

    worker: str
    model: str
    lease_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def apply(job: Job, outcome: Outcome, result: AttemptResult, *, attempt_number: int, task_id: str, now: float,
          application: Application) -> Job:
    """The job after `outcome`; raises `TransitionRefused` for STOP (nothing is written)."""
    end = lifecycle.AttemptEnd(attempt_number=attempt_number, task_id=task_id, now=now, answer=result.answer,
                               confidence=result.confidence, usage=result.usage, cost_usd=result.cost_usd,
                               billed=outcome.billed, verdict=result.verdict,
                               error=result.error.info() if result.error is not None else None,
                               estimated_frontier_cost_usd=result.estimated_frontier_cost_usd)
    if outcome.kind is OutcomeKind.STOP:
        raise lifecycle.TransitionRefused(outcome.reasons[0] if outcome.reasons else lifecycle.REFUSED_NOT_OWNER)
    if outcome.kind is OutcomeKind.SUCCEED:
        return lifecycle.succeed(job, end)
    if outcome.kind is OutcomeKind.ESCALATE:
        return lifecycle.escalate(job, end, reasons=list(outcome.reasons))
    if outcome.kind is OutcomeKind.REASK:
        return lifecycle.reask(job, end, model=application.model, worker=application.worker,
                               lease_s=application.lease_s)
    if outcome.kind is OutcomeKind.RETRY:
        return lifecycle.retry_later(job, end, retry_at=now + outcome.retry_in_s)
    assert outcome.error is not None, "a FAIL outcome carries its error"
    return lifecycle.fail(job, end, error=outcome.error, dead_letter=outcome.dead_letter)

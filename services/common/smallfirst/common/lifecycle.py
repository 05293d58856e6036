"""The job state machine as pure functions: each takes a job and returns the next version of it.

The store applies them with a compare-and-set, so a redelivered task, a duplicate message or a
late answer after a cancel can never complete a job twice, bill twice or overwrite a cancel.
A function raises `TransitionRefused` when the job is not in a state it may move from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from smallfirst.common.errors import SmallfirstError
from smallfirst.common.jobs import (
    Attempt,
    AttemptOutcome,
    ErrorInfo,
    Job,
    JobStatus,
    Tier,
    Usage,
    Verdict,
)


class TransitionRefused(SmallfirstError):
    """The job is not in a state this transition may move it from; `reason` says why. Not a failure:
    the caller drops what it was about to write (a late answer after a cancel, a duplicate)."""

    code = "transition_refused"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Reasons a delivery is refused, so callers can act on them (e.g. re-publish a pending escalation).
REFUSED_TERMINAL = "terminal"
REFUSED_LEASED = "leased_by_another_delivery"
REFUSED_WRONG_TIER = "job_is_on_another_tier"
REFUSED_ESCALATION_PENDING = "escalation_pending"
REFUSED_NOT_OWNER = "attempt_not_owned"
REFUSED_NOT_DEAD_LETTERED = "not_dead_lettered"


def _touch(job: Job, now: float) -> Job:
    job.updated_at = now
    return job


def begin_attempt(job: Job, *, tier: Tier, model: str, worker: str, task_id: str, now: float,
                  lease_s: float, batched: bool = False) -> Job:
    """Start an attempt on `tier` for the delivery `task_id`.

    Allowed from: `queued` on the tier the job was routed to; `escalated` for the frontier tier;
    `running` whose open attempt on the same tier has an expired lease (its worker died): that
    attempt is marked abandoned and is never billed.
    """
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    open_attempt = job.open_attempt()
    if job.status is JobStatus.QUEUED:
        if job.route.tier is not tier:
            raise TransitionRefused(REFUSED_WRONG_TIER)
    elif job.status is JobStatus.ESCALATED:
        if tier is not Tier.FRONTIER:
            raise TransitionRefused(REFUSED_ESCALATION_PENDING)
    elif job.status is JobStatus.RUNNING:
        if open_attempt is None or open_attempt.tier is not tier:
            raise TransitionRefused(REFUSED_WRONG_TIER)
        if open_attempt.lease_expires_at > now:
            raise TransitionRefused(REFUSED_LEASED)
        open_attempt.outcome = AttemptOutcome.ABANDONED
        open_attempt.ended_at = now
        open_attempt.error = ErrorInfo(code="worker_lost",
                                       message="the worker running this attempt stopped before it ended")
    queued_since = job.queued_at
    job.retry_at = None
    job.attempts.append(Attempt(
        number=len(job.attempts) + 1, tier=tier, model=model, worker=worker, task_id=task_id,
        lease_expires_at=now + lease_s, started_at=now, queue_wait_ms=max(0.0, (now - queued_since) * 1000),
        batched=batched,
    ))
    job.status = JobStatus.RUNNING
    return _touch(job, now)


def renew_lease(job: Job, *, attempt_number: int, task_id: str, now: float, lease_s: float) -> Job:
    """The delivery running attempt `attempt_number` is alive: hold the job `lease_s` longer.

    Refused unless that attempt is still open and run by that delivery (it ended, was cancelled,
    or the sweeper gave the job to another delivery after the lease ran out)."""
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    attempt = job.open_attempt()
    if (job.status is not JobStatus.RUNNING or attempt is None or attempt.number != attempt_number
            or attempt.task_id != task_id):
        raise TransitionRefused(REFUSED_NOT_OWNER)
    attempt.lease_expires_at = max(attempt.lease_expires_at, now + lease_s)
    return job


@dataclass(frozen=True)
class AttemptEnd:
    """How one attempt ended: which attempt (and delivery), when, and what it produced."""

    attempt_number: int
    task_id: str
    now: float
    answer: Any = None
    confidence: float | None = None
    usage: Usage | None = None
    cost_usd: float = 0.0
    billed: bool = False
    verdict: Verdict | None = None
    error: ErrorInfo | None = None
    estimated_frontier_cost_usd: float | None = None


def _owned_attempt(job: Job, end: AttemptEnd) -> Attempt:
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    attempt = job.open_attempt()
    if (job.status is not JobStatus.RUNNING or attempt is None or attempt.number != end.attempt_number
            or attempt.task_id != end.task_id):
        raise TransitionRefused(REFUSED_NOT_OWNER)
    return attempt


def _close(attempt: Attempt, end: AttemptEnd, outcome: AttemptOutcome) -> None:
    attempt.outcome = outcome
    attempt.ended_at = end.now
    attempt.latency_ms = round((end.now - attempt.started_at) * 1000, 3)
    attempt.answer = end.answer
    attempt.confidence = end.confidence
    attempt.usage = end.usage or Usage()
    attempt.cost_usd = end.cost_usd
    attempt.billed = end.billed
    attempt.estimated_frontier_cost_usd = end.estimated_frontier_cost_usd
    attempt.verdict = end.verdict
    attempt.error = end.error


def _answer_outcome(end: AttemptEnd) -> AttemptOutcome:
    return AttemptOutcome.ERROR if end.error is not None else AttemptOutcome.REJECTED


def succeed(job: Job, end: AttemptEnd) -> Job:
    attempt = _owned_attempt(job, end)
    _close(attempt, end, AttemptOutcome.ACCEPTED)
    job.status = JobStatus.SUCCEEDED
    job.result = end.answer
    job.error = None
    job.ended_at = end.now
    return _touch(job, end.now)


def reask(job: Job, end: AttemptEnd, *, model: str, worker: str, lease_s: float) -> Job:
    """A frontier answer failed validation and the task may ask again: close it and open the next
    attempt for the same delivery (sent the same way: a batched attempt's re-ask is batched too)."""
    attempt = _owned_attempt(job, end)
    _close(attempt, end, AttemptOutcome.REJECTED)
    job.attempts.append(Attempt(
        number=len(job.attempts) + 1, tier=attempt.tier, model=model, worker=worker, task_id=end.task_id,
        lease_expires_at=end.now + lease_s, started_at=end.now, batched=attempt.batched,
    ))
    return _touch(job, end.now)


def escalate(job: Job, end: AttemptEnd, *, reasons: list[str]) -> Job:
    """The small tier's answer failed validation (or the small tier failed): hand over to frontier."""
    attempt = _owned_attempt(job, end)
    if attempt.tier is not Tier.SMALL:
        raise TransitionRefused(REFUSED_WRONG_TIER)
    _close(attempt, end, _answer_outcome(end))
    job.status = JobStatus.ESCALATED
    job.escalation_reasons = list(reasons)
    job.queued_at = end.now
    return _touch(job, end.now)


def retry_later(job: Job, end: AttemptEnd, *, retry_at: float) -> Job:
    """A dependency failed: close the attempt unanswered and put the job back where it waits for
    its tier (an escalated job waits for the frontier again), due at `retry_at`."""
    attempt = _owned_attempt(job, end)
    _close(attempt, end, AttemptOutcome.RETRIED)
    escalated = attempt.tier is Tier.FRONTIER and any(a.tier is Tier.SMALL for a in job.attempts)
    job.status = JobStatus.ESCALATED if escalated else JobStatus.QUEUED
    job.retry_at = retry_at
    job.queued_at = retry_at
    return _touch(job, end.now)


def fail(job: Job, end: AttemptEnd, *, error: ErrorInfo, dead_letter: str | None = None) -> Job:
    """End the job as failed; `dead_letter` (a reason code) puts it into its tenant's dead letters."""
    attempt = _owned_attempt(job, end)
    rejected = end.verdict is not None and not end.verdict.passed
    _close(attempt, end, AttemptOutcome.REJECTED if rejected else AttemptOutcome.ERROR)
    job.status = JobStatus.FAILED
    job.error = error
    job.dead_letter = dead_letter
    job.ended_at = end.now
    return _touch(job, end.now)


def replay(job: Job, *, now: float, deadline_s: float) -> Job:
    """A new run of a dead-lettered job, its history kept: it waits for the tier it failed on (an
    escalated job for the frontier again) with a fresh deadline of `deadline_s`, and leaves the
    dead letters (the store removes its entry in the same transaction)."""
    if job.status is not JobStatus.FAILED or job.dead_letter is None:
        raise TransitionRefused(REFUSED_NOT_DEAD_LETTERED)
    last = job.attempts[-1] if job.attempts else None
    escalated = last is not None and last.tier is Tier.FRONTIER and any(a.tier is Tier.SMALL for a in job.attempts)
    job.status = JobStatus.ESCALATED if escalated else JobStatus.QUEUED
    job.error = None
    job.result = None
    job.dead_letter = None
    job.ended_at = None
    job.retry_at = None
    job.replays += 1
    job.replayed_at = now
    job.queued_at = now
    job.deadline_at = now + deadline_s
    return _touch(job, now)


def cancel(job: Job, *, now: float) -> Job:
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    attempt = job.open_attempt()
    if attempt is not None:
        attempt.outcome = AttemptOutcome.CANCELLED
        attempt.ended_at = now
    job.status = JobStatus.CANCELLED
    job.ended_at = now
    return _touch(job, now)

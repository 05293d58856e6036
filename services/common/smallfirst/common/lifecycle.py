"""The job state machine as pure functions: each takes a job and returns the next version of it.

The store applies them with a compare-and-set, so a redelivered task, a duplicate message or a
late answer after a cancel can never complete a job twice, bill twice or overwrite a cancel.
A function raises `TransitionRefused` when the job is not in a state it may move from.
"""

from __future__ import annotations

from typing import Any

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


class TransitionRefused(Exception):
    """The job is not in a state this transition may move it from; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Reasons a delivery is refused, so callers can act on them (e.g. re-publish a pending escalation).
REFUSED_TERMINAL = "terminal"
REFUSED_LEASED = "leased_by_another_delivery"
REFUSED_WRONG_TIER = "job_is_on_another_tier"
REFUSED_ESCALATION_PENDING = "escalation_pending"
REFUSED_NOT_OWNER = "attempt_not_owned"


def _touch(job: Job, now: float) -> Job:
    job.updated_at = now
    return job


def begin_attempt(job: Job, *, tier: Tier, model: str, worker: str, task_id: str, now: float,
                  lease_s: float) -> Job:
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
    job.attempts.append(Attempt(
        number=len(job.attempts) + 1, tier=tier, model=model, worker=worker, task_id=task_id,
        lease_expires_at=now + lease_s, started_at=now, queue_wait_ms=max(0.0, (now - queued_since) * 1000),
    ))
    job.status = JobStatus.RUNNING
    return _touch(job, now)


def _owned_attempt(job: Job, attempt_number: int, task_id: str) -> Attempt:
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    attempt = job.open_attempt()
    if (job.status is not JobStatus.RUNNING or attempt is None or attempt.number != attempt_number
            or attempt.task_id != task_id):
        raise TransitionRefused(REFUSED_NOT_OWNER)
    return attempt


def _close(attempt: Attempt, *, outcome: AttemptOutcome, now: float, answer: Any = None,
           confidence: float | None = None, usage: Usage | None = None, cost_usd: float = 0.0,
           billed: bool = False, estimated_frontier_cost_usd: float | None = None,
           verdict: Verdict | None = None, error: ErrorInfo | None = None) -> None:
    attempt.outcome = outcome
    attempt.ended_at = now
    attempt.latency_ms = round((now - attempt.started_at) * 1000, 3)
    attempt.answer = answer
    attempt.confidence = confidence
    attempt.usage = usage or Usage()
    attempt.cost_usd = cost_usd
    attempt.billed = billed
    attempt.estimated_frontier_cost_usd = estimated_frontier_cost_usd
    attempt.verdict = verdict
    attempt.error = error


def succeed(job: Job, *, attempt_number: int, task_id: str, now: float, answer: Any, confidence: float | None,
            usage: Usage, cost_usd: float, verdict: Verdict,
            estimated_frontier_cost_usd: float | None = None) -> Job:
    attempt = _owned_attempt(job, attempt_number, task_id)
    _close(attempt, outcome=AttemptOutcome.ACCEPTED, now=now, answer=answer, confidence=confidence, usage=usage,
           cost_usd=cost_usd, billed=True, estimated_frontier_cost_usd=estimated_frontier_cost_usd, verdict=verdict)
    job.status = JobStatus.SUCCEEDED
    job.result = answer
    job.error = None
    job.ended_at = now
    return _touch(job, now)


def reject_and_retry(job: Job, *, attempt_number: int, task_id: str, now: float, answer: Any,
                     confidence: float | None, usage: Usage, cost_usd: float, verdict: Verdict, model: str,
                     worker: str, lease_s: float) -> Job:
    """A frontier answer failed validation and the task may ask again: close it (billed) and open
    the next attempt for the same delivery."""
    attempt = _owned_attempt(job, attempt_number, task_id)
    _close(attempt, outcome=AttemptOutcome.REJECTED, now=now, answer=answer, confidence=confidence, usage=usage,
           cost_usd=cost_usd, billed=True, verdict=verdict)
    job.attempts.append(Attempt(
        number=len(job.attempts) + 1, tier=attempt.tier, model=model, worker=worker, task_id=task_id,
        lease_expires_at=now + lease_s, started_at=now,
    ))
    return _touch(job, now)


def escalate(job: Job, *, attempt_number: int, task_id: str, now: float, reasons: list[str], answer: Any = None,
             confidence: float | None = None, usage: Usage | None = None, cost_usd: float = 0.0,
             verdict: Verdict | None = None, error: ErrorInfo | None = None,
             estimated_frontier_cost_usd: float | None = None) -> Job:
    """The small tier's answer failed validation (or the small tier failed): hand over to frontier."""
    attempt = _owned_attempt(job, attempt_number, task_id)
    if attempt.tier is not Tier.SMALL:
        raise TransitionRefused(REFUSED_WRONG_TIER)
    _close(attempt, outcome=AttemptOutcome.REJECTED if error is None else AttemptOutcome.ERROR, now=now,
           answer=answer, confidence=confidence, usage=usage, cost_usd=cost_usd, billed=usage is not None,
           estimated_frontier_cost_usd=estimated_frontier_cost_usd, verdict=verdict, error=error)
    job.status = JobStatus.ESCALATED
    job.escalation_reasons = list(reasons)
    job.queued_at = now
    return _touch(job, now)


def fail(job: Job, *, attempt_number: int, task_id: str, now: float, error: ErrorInfo, answer: Any = None,
         confidence: float | None = None, usage: Usage | None = None, cost_usd: float = 0.0,
         billed: bool = False, verdict: Verdict | None = None,
         estimated_frontier_cost_usd: float | None = None) -> Job:
    attempt = _owned_attempt(job, attempt_number, task_id)
    _close(attempt, outcome=AttemptOutcome.REJECTED if verdict is not None and not verdict.passed
           else AttemptOutcome.ERROR, now=now, answer=answer, confidence=confidence, usage=usage,
           cost_usd=cost_usd, billed=billed, estimated_frontier_cost_usd=estimated_frontier_cost_usd,
           verdict=verdict, error=error)
    job.status = JobStatus.FAILED
    job.error = error
    job.ended_at = now
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


def requeue(job: Job, *, now: float) -> Job:
    """The sweeper found a job whose message may be lost; it stays where it is, only re-armed."""
    if job.status.terminal:
        raise TransitionRefused(REFUSED_TERMINAL)
    return _touch(job, now)

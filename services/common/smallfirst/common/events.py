"""What one stored transition of a job means for the books: one stream of events, two readers.

`transition_events(before, after)` is the only place that reads a pair of job records and says
what happened between them: a job was submitted, an attempt started or ended (and was billed), the
job escalated, the job ended. The job store turns the events into the tenant's `/v1/stats`
counters inside the same transaction as the record (`stats_increments`), and `JobMetrics.record`
turns the same events into Prometheus counters after the write. Because both read one stream,
the statistics and the metrics cannot disagree; because the store's compare-and-set lets each
transition happen once, each event is counted once however often a message is delivered.

A pair in which nothing changed yields no event, so a repeated call adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from smallfirst.common.jobs import Attempt, AttemptOutcome, Job, JobStatus, Tier
from smallfirst.common.telemetry import reason_code


@dataclass(frozen=True)
class Submitted:
    tier: Tier  # where the routing policy sent it


@dataclass(frozen=True)
class AttemptStarted:
    tier: Tier
    queue_wait_s: float | None


@dataclass(frozen=True)
class AttemptEnded:
    tier: Tier
    outcome: AttemptOutcome
    run_s: float | None
    billed: bool
    cost_usd: float
    input_tokens: int
    output_tokens: int
    # Sent in a Message Batch: billed at the batch price; `batch_savings_usd` is what the same
    # tokens would have cost in real time less what they cost.
    batched: bool = False
    batch_savings_usd: float = 0.0


@dataclass(frozen=True)
class Escalated:
    reason_codes: tuple[str, ...]  # distinct, sorted; "unknown" when none was given


@dataclass(frozen=True)
class Ended:
    tier: Tier  # the tier the job was on when it ended
    status: JobStatus
    submit_to_result_s: float | None
    served_by: Tier | None  # the tier whose answer became the result
    estimated_frontier_cost_usd: float | None  # for a result of the small tier
    savings_usd: float  # that estimate less what the job was billed (0 unless the small tier served it)
    error_code: str | None


@dataclass(frozen=True)
class FeedbackGiven:
    served_by: Tier | None  # the tier whose answer the person judged
    agrees: bool


@dataclass(frozen=True)
class DeadLettered:
    reason: str  # the job's dead-letter reason (its error code)


@dataclass(frozen=True)
class Replayed:
    """A dead-lettered job runs again: it is no longer ended (its earlier end is taken back)."""

    reason: str  # the dead-letter reason it was replayed from
    error_code: str | None


JobEvent = Submitted | AttemptStarted | AttemptEnded | Escalated | Ended | DeadLettered | Replayed | FeedbackGiven


def transition_events(before: Job | None, after: Job) -> list[JobEvent]:
    events: list[JobEvent] = []
    if before is None:
        events.append(Submitted(tier=after.route.tier))
    previous = {a.number: a for a in before.attempts} if before is not None else {}
    for attempt in after.attempts:
        old = previous.get(attempt.number)
        if old is None:
            events.append(AttemptStarted(
                tier=attempt.tier,
                queue_wait_s=attempt.queue_wait_ms / 1000 if attempt.queue_wait_ms is not None else None))
        if attempt.ended_at is not None and (old is None or old.ended_at is None):
            events.append(AttemptEnded(
                tier=attempt.tier, outcome=attempt.outcome,
                run_s=attempt.latency_ms / 1000 if attempt.latency_ms is not None else None,
                billed=attempt.billed, cost_usd=attempt.cost_usd if attempt.billed else 0.0,
                input_tokens=attempt.usage.input_tokens if attempt.billed else 0,
                output_tokens=attempt.usage.output_tokens if attempt.billed else 0,
                batched=attempt.batched, batch_savings_usd=_batch_savings(attempt)))
    if after.status is JobStatus.ESCALATED and (before is None or before.status is not JobStatus.ESCALATED) \
            and not _escalated_before(before):
        codes = tuple(sorted({reason_code(r) for r in after.escalation_reasons} or {"unknown"}))
        events.append(Escalated(reason_codes=codes))
    if after.status.terminal and (before is None or not before.status.terminal):
        served = _served_by(after)
        estimate = _small_estimate(after) if served is Tier.SMALL else None
        events.append(Ended(
            tier=(before if before is not None else after).current_tier,
            status=after.status,
            submit_to_result_s=max(0.0, after.ended_at - after.created_at) if after.ended_at is not None else None,
            served_by=served,
            estimated_frontier_cost_usd=estimate,
            savings_usd=(estimate - after.total_cost_usd()) if estimate is not None else 0.0,
            error_code=after.error.code if after.error is not None else None))
        if after.dead_letter is not None:
            events.append(DeadLettered(reason=after.dead_letter))
    if before is not None and before.dead_letter is not None and after.dead_letter is None:
        events.append(Replayed(reason=before.dead_letter,
                               error_code=before.error.code if before.error is not None else None))
    if after.feedback is not None and (before is None or before.feedback is None):
        events.append(FeedbackGiven(served_by=after.feedback.served_by, agrees=after.feedback.agrees))
    return events


def _batch_savings(attempt: Attempt) -> float:
    """A billed batched attempt carries the realtime price of its tokens as its frontier estimate."""
    if not (attempt.batched and attempt.billed) or attempt.estimated_frontier_cost_usd is None:
        return 0.0
    return max(0.0, attempt.estimated_frontier_cost_usd - attempt.cost_usd)


def _escalated_before(before: Job | None) -> bool:
    """An escalated job that waits again after a failed frontier attempt escalated only once."""
    return before is not None and any(a.tier is Tier.FRONTIER for a in before.attempts) \
        and any(a.tier is Tier.SMALL for a in before.attempts)


def _served_by(job: Job) -> Tier | None:
    accepted = [a for a in job.attempts if a.outcome is AttemptOutcome.ACCEPTED]
    return accepted[-1].tier if accepted and job.status is JobStatus.SUCCEEDED else None


def _small_estimate(job: Job) -> float | None:
    accepted = [a for a in job.attempts if a.outcome is AttemptOutcome.ACCEPTED]
    return accepted[-1].estimated_frontier_cost_usd if accepted else None


def stats_increments(events: list[JobEvent]) -> dict[str, float | int]:
    """The tenant's per-task counters (`/v1/stats`) that these events move.

    Integers stay integers and amounts stay floats: the store adds them with HINCRBY and
    HINCRBYFLOAT by type (a float added with HINCRBY fails the whole transaction)."""
    fields: dict[str, float | int] = {}

    def add(name: str, amount: float | int) -> None:
        fields[name] = fields.get(name, 0) + amount

    for event in events:
        if isinstance(event, Submitted):
            add("jobs_submitted", 1)
            add(f"routed:{event.tier.value}", 1)
        elif isinstance(event, AttemptEnded):
            if event.batched:
                add("attempts_batched", 1)
            if not event.billed:
                continue
            add(f"cost_usd:{event.tier.value}", float(event.cost_usd))
            add("cost_usd", float(event.cost_usd))
            add("input_tokens", event.input_tokens)
            add("output_tokens", event.output_tokens)
            if event.batched:
                add("cost_usd:batch", float(event.cost_usd))
                add("batch_savings_usd", float(event.batch_savings_usd))
        elif isinstance(event, Escalated):
            add("escalated", 1)
            for code in event.reason_codes:
                add(f"escalation_reason:{code}", 1)
        elif isinstance(event, Ended):
            add("jobs_ended", 1)
            add(f"status:{event.status.value}", 1)
            if event.served_by is not None:
                add(f"served:{event.served_by.value}", 1)
            if event.estimated_frontier_cost_usd is not None:
                add("estimated_frontier_cost_usd", float(event.estimated_frontier_cost_usd))
                add("savings_usd", float(event.savings_usd))
            if event.error_code is not None:
                add(f"error:{event.error_code}", 1)
        elif isinstance(event, FeedbackGiven):
            add("feedback", 1)
            if not event.agrees:
                # Errors found by people, by the tier that made them.
                add(f"feedback_errors:{event.served_by.value if event.served_by else 'none'}", 1)
        elif isinstance(event, DeadLettered):
            add("dead_lettered", 1)
        elif isinstance(event, Replayed):
            # The failure is taken back: the job counts as ended once, by how its last run ended.
            add("replayed", 1)
            add("jobs_ended", -1)
            add(f"status:{JobStatus.FAILED.value}", -1)
            if event.error_code is not None:
                add(f"error:{event.error_code}", -1)
    return fields

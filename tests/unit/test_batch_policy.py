"""Batch mode's pure parts: which attempts go in a batch, and what a batched attempt adds to the books."""

from __future__ import annotations

import pytest

from smallfirst.common import lifecycle
from smallfirst.common.events import AttemptEnded, stats_increments, transition_events
from smallfirst.common.jobs import FrontierMode, Job, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.frontier_worker.batch_lane import BatchPolicy, use_batch

NOW = 50_000.0
POLICY = BatchPolicy(lease_s=90_000, max_tries=2, min_time_left_s=600)


def job(mode: FrontierMode, *, deadline_in_s: float | None = 86_400, failed_batched_tries: int = 0) -> Job:
    record = Job(id="job_1", tenant="t", task="summary", input={"text": "x"},
                 route=RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.TASK_DEFAULT, frontier_mode=mode),
                 created_at=NOW - 100, updated_at=NOW - 100, queued_at=NOW - 100,
                 deadline_at=None if deadline_in_s is None else NOW + deadline_in_s)
    for n in range(failed_batched_tries):
        record = lifecycle.begin_attempt(record, tier=Tier.FRONTIER, model="m", worker="w", task_id=f"d{n}",
                                         now=NOW - 50, lease_s=POLICY.lease_s, batched=True)
        record = lifecycle.retry_later(record, lifecycle.AttemptEnd(attempt_number=n + 1, task_id=f"d{n}",
                                                                    now=NOW - 40), retry_at=NOW - 40)
    return record


@pytest.mark.parametrize(("given", "batched"), [
    (job(FrontierMode.REALTIME), False),
    (job(FrontierMode.BATCH), True),
    (job(FrontierMode.BATCH, deadline_in_s=None), True),
    (job(FrontierMode.BATCH, failed_batched_tries=1), True),
    (job(FrontierMode.BATCH, failed_batched_tries=2), False),  # retries after max_tries run in real time
    (job(FrontierMode.BATCH, deadline_in_s=300), False),  # too little time left for a batch
], ids=["realtime job", "batch job", "batch job without deadline", "one failed batch try",
        "max batch tries failed", "deadline near"])
def test_a_batch_mode_job_is_batched_until_its_tries_or_its_time_run_out(given: Job, batched: bool) -> None:
    # when / then
    assert use_batch(given, POLICY, NOW) is batched


def test_a_billed_batched_attempt_counts_its_batch_cost_and_what_batching_saved() -> None:
    # given: a batched attempt billed at half the realtime price of its tokens
    begun = lifecycle.begin_attempt(job(FrontierMode.BATCH), tier=Tier.FRONTIER, model="m", worker="w",
                                    task_id="d", now=NOW, lease_s=POLICY.lease_s, batched=True)

    # when
    ended = lifecycle.succeed(begun.model_copy(deep=True), lifecycle.AttemptEnd(
        attempt_number=1, task_id="d", now=NOW + 60, answer="ok", usage=Usage(input_tokens=100, output_tokens=10),
        cost_usd=0.0005, billed=True, verdict=Verdict(passed=True), estimated_frontier_cost_usd=0.001))
    events = transition_events(begun, ended)
    fields = stats_increments(events)

    # then
    attempt_ended = [e for e in events if isinstance(e, AttemptEnded)]
    assert len(attempt_ended) == 1
    assert attempt_ended[0].batched
    assert fields["attempts_batched"] == 1
    assert fields["cost_usd:batch"] == pytest.approx(0.0005)
    assert fields["batch_savings_usd"] == pytest.approx(0.0005)
    assert fields["cost_usd"] == pytest.approx(0.0005)
    # and saved by the small tier stays apart: nothing of it here
    assert "savings_usd" not in fields


def test_a_realtime_attempt_adds_nothing_to_the_batch_figures() -> None:
    # given
    begun = lifecycle.begin_attempt(job(FrontierMode.REALTIME), tier=Tier.FRONTIER, model="m", worker="w",
                                    task_id="d", now=NOW, lease_s=60)

    # when
    ended = lifecycle.succeed(begun.model_copy(deep=True), lifecycle.AttemptEnd(
        attempt_number=1, task_id="d", now=NOW + 1, answer="ok", usage=Usage(input_tokens=100), cost_usd=0.001,
        billed=True, verdict=Verdict(passed=True)))
    fields = stats_increments(transition_events(begun, ended))

    # then
    assert "cost_usd:batch" not in fields
    assert "attempts_batched" not in fields
    assert fields["cost_usd"] == pytest.approx(0.001)

"""The job store's compare-and-set transitions against a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.jobs import (
    AttemptOutcome,
    ErrorInfo,
    Job,
    JobStatus,
    RouteDecision,
    RouteReason,
    Tier,
    Usage,
    Verdict,
    new_job_id,
)
from smallfirst.common.store import JobNotFound, JobStore


@pytest.fixture
def store(redis_url: str) -> JobStore:
    return JobStore(redis.Redis.from_url(redis_url), retention_s=3600, stale_after_s=600)


def make_job(tier: Tier = Tier.SMALL, callback_url: str | None = None) -> Job:
    now = time.time()
    return Job(id=new_job_id(), tenant="t1", task="banking77_intent", input={"text": "where is my card"},
               route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT), created_at=now, updated_at=now,
               queued_at=now, callback_url=callback_url)


def begin(store: JobStore, job: Job, tier: Tier, task_id: str, lease_s: float = 60, now: float | None = None) -> Job:
    return store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=tier, model="m", worker="w", task_id=task_id, now=now or time.time(), lease_s=lease_s))[1]


def test_duplicate_delivery_cannot_start_a_second_attempt(store: JobStore) -> None:
    # given: a job whose first delivery holds a live lease
    job = make_job()
    store.create(job)
    begin(store, job, Tier.SMALL, "delivery-1")
    # when / then: a second delivery is refused
    with pytest.raises(lifecycle.TransitionRefused) as info:
        begin(store, job, Tier.SMALL, "delivery-2")
    assert info.value.reason == lifecycle.REFUSED_LEASED


def test_redelivery_after_lease_expiry_abandons_the_dead_attempt_unbilled(store: JobStore) -> None:
    # given: an attempt whose worker died (lease already expired)
    job = make_job()
    store.create(job)
    begin(store, job, Tier.SMALL, "delivery-1", lease_s=-1)
    # when
    after = begin(store, job, Tier.SMALL, "delivery-1")
    # then
    assert [a.outcome for a in after.attempts] == [AttemptOutcome.ABANDONED, AttemptOutcome.RUNNING]
    assert not after.attempts[0].billed
    assert after.attempts[0].error is not None
    assert after.attempts[0].error.code == "worker_lost"


def test_job_completes_exactly_once_under_concurrent_completions(store: JobStore) -> None:
    # given: a running attempt
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    attempt_no = running.attempts[-1].number
    results: list[str] = []

    def complete() -> None:
        try:
            store.transition(job.id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
                attempt_number=attempt_no, task_id="d1", now=time.time(), answer={"label": "card_arrival"},
                confidence=0.9, usage=Usage(input_tokens=5), cost_usd=0.0, verdict=Verdict(passed=True),
                billed=True)))
            results.append("won")
        except lifecycle.TransitionRefused:
            results.append("refused")

    # when: eight threads race to complete the same attempt
    threads = [threading.Thread(target=complete) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then: one wins, the stats count one ended job
    assert sorted(results) == ["refused"] * 7 + ["won"]
    stats = store.redis.hgetall(k.stats_key("t1", "banking77_intent"))
    assert stats[b"jobs_ended"] == b"1"
    assert stats[b"status:succeeded"] == b"1"


def test_late_answer_does_not_overwrite_cancel(store: JobStore) -> None:
    # given: a running job that the tenant cancels
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    store.transition(job.id, lambda j: lifecycle.cancel(j, now=time.time()))
    # when: the worker's answer arrives afterwards
    with pytest.raises(lifecycle.TransitionRefused):
        store.transition(job.id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
            attempt_number=running.attempts[-1].number, task_id="d1", now=time.time(), answer={"label": "x"},
            confidence=1.0, usage=Usage(), cost_usd=0.0, verdict=Verdict(passed=True), billed=True)))
    # then
    final = store.get(job.id)
    assert final.status is JobStatus.CANCELLED
    assert final.result is None


def test_escalation_hands_job_to_frontier_and_counts_reason(store: JobStore) -> None:
    # given: a small attempt whose answer failed validation
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    _, escalated = store.transition(job.id, lambda j: lifecycle.escalate(j, lifecycle.AttemptEnd(
        attempt_number=running.attempts[-1].number, task_id="d1", now=time.time(),
        answer={"label": "card_arrival"}, confidence=0.2, usage=Usage(input_tokens=7),
        verdict=Verdict(passed=False, reasons=["min_confidence: low"]), billed=True),
        reasons=["min_confidence: confidence 0.2 is below 0.5"]))
    assert escalated.status is JobStatus.ESCALATED
    # when: a small delivery arrives again, it is refused; a frontier delivery starts
    with pytest.raises(lifecycle.TransitionRefused) as info:
        begin(store, job, Tier.SMALL, "d1-again")
    assert info.value.reason == lifecycle.REFUSED_ESCALATION_PENDING
    frontier = begin(store, job, Tier.FRONTIER, "f1")
    _, done = store.transition(job.id, lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=frontier.attempts[-1].number, task_id="f1", now=time.time(),
        answer={"label": "card_arrival"}, confidence=None, usage=Usage(input_tokens=100, output_tokens=10),
        cost_usd=0.002, verdict=Verdict(passed=True), billed=True)))
    # then
    assert [a.tier for a in done.attempts] == [Tier.SMALL, Tier.FRONTIER]
    stats = store.redis.hgetall(k.stats_key("t1", "banking77_intent"))
    assert stats[b"escalated"] == b"1"
    assert stats[b"escalation_reason:min_confidence"] == b"1"
    assert stats[b"served:frontier"] == b"1"
    assert float(stats[b"cost_usd"]) == pytest.approx(0.002)


def test_terminal_transition_publishes_event_and_fills_webhook_outbox(store: JobStore) -> None:
    # given: a job with a callback and a subscriber on its channel
    job = make_job(callback_url="https://hooks.example.com/x")
    store.create(job)
    pubsub = store.redis.pubsub()
    pubsub.subscribe(k.job_events_channel(job.id))
    pubsub.get_message(timeout=1)
    running = begin(store, job, Tier.SMALL, "d1")
    # when
    store.transition(job.id, lambda j: lifecycle.fail(j, lifecycle.AttemptEnd(
        attempt_number=running.attempts[-1].number, task_id="d1", now=time.time()),
        error=ErrorInfo(code="validation_failed", message="no")))
    # then
    message = pubsub.get_message(timeout=2)
    assert message is not None
    assert message["data"] == b"failed"
    assert store.redis.zscore(k.WEBHOOK_OUTBOX_KEY, job.id) is not None
    assert store.redis.zscore(k.ACTIVE_JOBS_KEY, job.id) is None


def test_active_index_tracks_lease_of_running_job(store: JobStore) -> None:
    job = make_job()
    store.create(job)
    now = time.time()
    begin(store, job, Tier.SMALL, "d1", lease_s=120, now=now)
    assert store.redis.zscore(k.ACTIVE_JOBS_KEY, job.id) == pytest.approx(now + 120)
    assert store.due_jobs(now + 119) == []
    assert store.due_jobs(now + 121) == [job.id]


def succeed_attempt(attempt_number: int, task_id: str) -> Callable[[Job], Job]:
    return lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=attempt_number, task_id=task_id, now=time.time(), answer={"label": "card_arrival"},
        confidence=0.9, usage=Usage(input_tokens=5), cost_usd=0.0, verdict=Verdict(passed=True), billed=True))


def command_calls(client: redis.Redis) -> dict[str, int]:
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


def test_a_transition_from_the_record_this_worker_wrote_does_not_read_the_job_first(store: JobStore) -> None:
    # given: a running attempt, whose record the worker holds from its own begin
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    before = command_calls(store.redis)

    # when: it ends the attempt from that record
    _, done = store.transition(job.id, succeed_attempt(running.attempts[-1].number, "d1"), expected=running)

    # then: the job ended, written by one script call and no GET of the worker
    after = command_calls(store.redis)
    assert done.status is JobStatus.SUCCEEDED
    assert store.get(job.id).status is JobStatus.SUCCEEDED
    assert after.get("evalsha", 0) - before.get("evalsha", 0) == 1
    # The script's own GET is counted too: one in all.
    assert after.get("get", 0) - before.get("get", 0) == 1


def test_a_transition_from_a_stale_record_is_applied_to_the_current_one(store: JobStore) -> None:
    # given: a running attempt that the tenant cancelled after the worker read it
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    store.transition(job.id, lambda j: lifecycle.cancel(j, now=time.time()))

    # when: the worker ends the attempt from the record it holds
    with pytest.raises(lifecycle.TransitionRefused):
        store.transition(job.id, succeed_attempt(running.attempts[-1].number, "d1"), expected=running)

    # then: the cancel stands
    final = store.get(job.id)
    assert final.status is JobStatus.CANCELLED
    assert final.result is None


def test_a_transition_of_a_job_that_expired_meanwhile_says_it_is_not_found(store: JobStore) -> None:
    # given: a running attempt whose record is gone (retention ended)
    job = make_job()
    store.create(job)
    running = begin(store, job, Tier.SMALL, "d1")
    store.redis.delete(k.job_key(job.id))

    # when / then
    with pytest.raises(JobNotFound):
        store.transition(job.id, succeed_attempt(running.attempts[-1].number, "d1"), expected=running)

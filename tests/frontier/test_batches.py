"""Frontier batch mode: the buffer and poller against a real Redis and the simulator's Message
Batches API through the real SDK, including processes SIGKILLed at their most dangerous point."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.frontier_worker.batches import (
    PAUSE_AFTER_CREATE,
    PAUSE_AFTER_HANDLE,
    PAUSE_AFTER_INTENT,
    PAUSE_AFTER_MARK,
    BatchBuffer,
    BatchConfig,
    BatchPoller,
    BatchResult,
    CancelOutcome,
    ResultType,
    custom_id_for,
    parse_custom_id,
)
from tests.frontier.batch_process import TEST_CONFIG
from tests.frontier_fixtures import HAIKU, SimControl
from tests.support.procs import ManagedProcess, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def params(text: str) -> dict[str, Any]:
    return {"model": HAIKU, "max_tokens": 32, "messages": [{"role": "user", "content": text}]}


def sdk(sim: SimControl) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-test", base_url=sim.url, max_retries=0)


class Collected:
    """A result handler that keeps what it was handed."""

    def __init__(self) -> None:
        self.results: list[BatchResult] = []

    def __call__(self, result: BatchResult) -> None:
        self.results.append(result)

    def custom_ids(self) -> list[str]:
        return [r.custom_id for r in self.results]


def poll_until_idle(poller: BatchPoller, timeout_s: float = 30) -> None:
    wait_until(lambda: poller.poll() >= 0 and not poller.active(), timeout_s, "every batch to be handled", 0.2)


@pytest.fixture
def quick_sim(start_frontier_sim: Callable[..., SimControl]) -> SimControl:
    """A simulator whose batches end 0.3 s after creation."""
    return start_frontier_sim(BATCH_PROCESSING_S="0.3", BATCH_CANCEL_S="0.2")


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_custom_ids_name_the_job_and_attempt_in_the_characters_the_api_accepts() -> None:
    assert custom_id_for("job_018f3a2b4c5d6e7f8091a2b3c4d5e6f7", 2) == "job_018f3a2b4c5d6e7f8091a2b3c4d5e6f7-2"
    assert parse_custom_id("job_018f3a2b4c5d6e7f8091a2b3c4d5e6f7-2") == ("job_018f3a2b4c5d6e7f8091a2b3c4d5e6f7", 2)
    with pytest.raises(ValueError, match="custom_id"):
        custom_id_for("job:1", 1)
    with pytest.raises(ValueError, match="custom_id"):
        parse_custom_id("nodash")


def test_a_full_buffer_goes_out_in_batches_and_every_result_is_handed_once(
        quick_sim: SimControl, redis_client: redis.Redis) -> None:
    # given
    config = BatchConfig(max_requests=5, max_age_s=3600)
    buffer = BatchBuffer(redis_client, sdk(quick_sim), config)
    handler = Collected()
    poller = BatchPoller(redis_client, sdk(quick_sim), handler, config)
    for n in range(4):
        buffer.add(f"job_{n:03d}", 1, params(f"question {n}"))
    not_due = buffer.flush()

    # when
    for n in range(4, 12):
        buffer.add(f"job_{n:03d}", 1, params(f"question {n}"))
    sent = buffer.flush()
    poll_until_idle(poller)
    again = poller.poll()

    # then
    assert not_due == []
    assert len(sent) == 2  # 10 of 12 requests: two full batches; 2 wait for more or for their age
    assert buffer.pending() == 2
    assert sorted(handler.custom_ids()) == sorted(f"job_{n:03d}-1" for n in range(10))
    assert again == 0
    for result in handler.results:
        assert result.type is ResultType.SUCCEEDED
        assert result.message is not None
        assert result.message.content[0].type == "text"
        assert result.message.content[0].text == f"question {int(result.job_id[4:])}"
        assert result.attempt == 1
        usage = result.usage()
        assert usage is not None
        assert usage.input_tokens >= 1
    assert quick_sim.stats()["batches"]["created"] == 2
    assert redis_client.ttl(k.batch_record_key(sent[0])) > 0
    assert redis_client.ttl(k.batch_handled_key(sent[0])) > 0


def test_the_oldest_request_sends_the_buffer_once_it_reaches_the_age(quick_sim: SimControl,
                                                                      redis_client: redis.Redis) -> None:
    # given
    now = [1_000.0]
    buffer = BatchBuffer(redis_client, sdk(quick_sim), BatchConfig(max_requests=100, max_age_s=30),
                         clock=lambda: now[0])
    buffer.add("job_old", 1, params("old"))
    now[0] += 10
    buffer.add("job_new", 1, params("new"))

    # when
    young = buffer.flush()
    now[0] += 25  # the first request is now 35 s old
    aged = buffer.flush()

    # then
    assert young == []
    assert len(aged) == 1
    assert buffer.pending() == 0


def test_errored_and_expired_results_reach_the_handler_with_their_type(quick_sim: SimControl,
                                                                        redis_client: redis.Redis) -> None:
    # given
    quick_sim.force_batch_outcomes({"job_b-1": "errored", "job_c-1": "expired"})
    buffer = BatchBuffer(redis_client, sdk(quick_sim))
    handler = Collected()
    for job in ("job_a", "job_b", "job_c"):
        buffer.add(job, 1, params(job))

    # when
    buffer.flush(force=True)
    poll_until_idle(BatchPoller(redis_client, sdk(quick_sim), handler))

    # then
    by_id = {r.custom_id: r for r in handler.results}
    assert by_id["job_a-1"].type is ResultType.SUCCEEDED
    assert by_id["job_b-1"].type is ResultType.ERRORED
    assert by_id["job_b-1"].error_type == "api_error"
    assert by_id["job_b-1"].usage() is None
    assert by_id["job_c-1"].type is ResultType.EXPIRED


def test_a_cancelled_request_leaves_the_buffer_or_cancels_a_batch_it_alone_is_left_in(
        start_frontier_sim: Callable[..., SimControl], redis_client: redis.Redis) -> None:
    # given
    sim = start_frontier_sim(BATCH_PROCESSING_S="600", BATCH_CANCEL_S="0.2")
    buffer = BatchBuffer(redis_client, sdk(sim))
    buffer.add("job_gone", 1, params("never sent"))
    removed = buffer.cancel("job_gone", 1)
    buffer.add("job_x", 1, params("x"))
    buffer.add("job_y", 1, params("y"))
    [batch_id] = buffer.flush(force=True)

    # when
    first = buffer.cancel("job_x", 1)
    second = buffer.cancel("job_y", 1)
    handler = Collected()
    poll_until_idle(BatchPoller(redis_client, sdk(sim), handler))

    # then
    assert removed is CancelOutcome.REMOVED
    assert first is CancelOutcome.NOT_CANCELLABLE  # job_y still wants its answer
    assert second is CancelOutcome.BATCH_CANCELLED
    assert sdk(sim).messages.batches.retrieve(batch_id).request_counts.canceled == 2
    assert sorted(handler.custom_ids()) == ["job_x-1", "job_y-1"]
    assert {r.type for r in handler.results} == {ResultType.CANCELED}
    assert buffer.cancel("job_never", 1) is CancelOutcome.UNKNOWN
    assert "job_gone-1" not in str(sim.stats()["batches"])


def _killed_at(mode: str, point: str, sim: SimControl, redis_url: str, logs_dir: Path, tmp_path: Path,
               *extra: str, pause_after: int = 1) -> None:
    """Run the batch process until it reaches `point`, then SIGKILL it there."""
    marker = tmp_path / f"{mode}-{point}.reached"
    process = ManagedProcess(
        f"batch-{mode}-{point}", [sys.executable, "-m", "tests.frontier.batch_process", mode,
                                  "--redis-url", redis_url, "--sim-url", sim.url, "--pause-at", point,
                                  "--pause-after", str(pause_after), "--marker", str(marker), *extra],
        logs_dir, cwd=REPO_ROOT).start()
    try:
        wait_until(marker.exists, 60, f"the {mode} process to reach {point}")
    finally:
        process.kill()


@pytest.mark.faults
@pytest.mark.parametrize(("point", "resolution"), [(PAUSE_AFTER_CREATE, "adopted"),
                                                   (PAUSE_AFTER_INTENT, "restored")])
def test_a_submitter_killed_between_intent_and_record_sends_nothing_twice_and_loses_nothing(
        start_frontier_sim: Callable[..., SimControl], redis_url: str, redis_client: redis.Redis,
        logs_dir: Path, tmp_path: Path, point: str, resolution: str) -> None:
    # given: six buffered requests, and a submitter SIGKILLed at `point`
    sim = start_frontier_sim(BATCH_PROCESSING_S="6")
    buffer = BatchBuffer(redis_client, sdk(sim), TEST_CONFIG)
    custom_ids = [buffer.add(f"job_{n}", 1, params(f"q{n}")) for n in range(6)]
    _killed_at("submit", point, sim, redis_url, logs_dir, tmp_path)
    orphaned = redis_client.zcard(k.BATCH_INTENTS_KEY)
    created_by_the_dead = sim.stats()["batches"]["created"]

    # when: reconcile runs until it resolves the orphan, then the buffer and poller carry on
    outcomes: list[dict[str, int]] = []

    def resolved() -> bool:
        outcomes.append(buffer.reconcile())
        return outcomes[-1]["adopted"] + outcomes[-1]["restored"] > 0

    wait_until(resolved, 60, "reconcile to resolve the orphaned intent", 0.3)
    buffer.flush(force=True)
    handler = Collected()
    poll_until_idle(BatchPoller(redis_client, sdk(sim), handler, TEST_CONFIG), timeout_s=60)

    # then
    assert orphaned == 1
    assert outcomes[-1][resolution] == 1
    assert redis_client.zcard(k.BATCH_INTENTS_KEY) == 0
    assert sorted(handler.custom_ids()) == sorted(custom_ids)
    stats = sim.stats()["batches"]
    assert stats["custom_ids_sent_more_than_once"] == []
    assert stats["requests_total"] == 6
    assert stats["created"] == 1
    if point == PAUSE_AFTER_CREATE:
        assert created_by_the_dead == 1
        # The dead process's batch was still processing: reconcile waited rather than resend.
        assert any(o["waiting"] for o in outcomes)
    else:
        assert created_by_the_dead == 0


@pytest.mark.faults
@pytest.mark.parametrize(("point", "atomic", "repeated"), [
    (PAUSE_AFTER_MARK, False, 0),  # killed between two results
    (PAUSE_AFTER_HANDLE, True, 0),  # killed after an effect committed with its mark
    (PAUSE_AFTER_HANDLE, False, 1),  # the documented window: an effect without its mark is handed again
])
def test_a_poller_killed_mid_results_resumes_without_dropping_a_result(
        quick_sim: SimControl, redis_url: str, redis_client: redis.Redis, logs_dir: Path, tmp_path: Path,
        point: str, atomic: bool, repeated: int) -> None:
    # given: an ended batch of eight, and a poller SIGKILLed at its third result
    buffer = BatchBuffer(redis_client, sdk(quick_sim), TEST_CONFIG)
    custom_ids = [buffer.add(f"job_{n}", 1, params(f"q{n}")) for n in range(8)]
    [batch_id] = buffer.flush(force=True)
    wait_until(lambda: sdk(quick_sim).messages.batches.retrieve(batch_id).processing_status == "ended", 30,
               "the batch to end")
    _killed_at("poll", point, quick_sim, redis_url, logs_dir, tmp_path, *(["--atomic"] if atomic else []),
               pause_after=3)
    before_restart = [c.decode() for c in redis_client.lrange("test:handled", 0, -1)]

    # when: a new poller takes over once the dead one's lock expired
    def handle(result: BatchResult) -> None:
        redis_client.rpush("test:handled", result.custom_id)

    poll_until_idle(BatchPoller(redis_client, sdk(quick_sim), handle, TEST_CONFIG))

    # then
    handled = [c.decode() for c in redis_client.lrange("test:handled", 0, -1)]
    assert len(before_restart) == 3
    assert set(handled) == set(custom_ids)
    assert len(handled) - len(set(handled)) == repeated

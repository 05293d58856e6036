"""The embedding coalescer: concurrent texts share one Embed call, bounded in size, gathered while
they wait; each text keeps its own deadline and cancellation; a call's error reaches each waiter.

The Embed call here is a recording function (the coalescer takes any `(model, texts, timeout_s)`
callable); the real client against a real server is exercised by tests/small_worker/test_executor.py.
Nothing is timed: the clock is a fake one, moved by the tests, and calls are held with events.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from smallfirst.small_worker.coalescer import CoalescerSettings, EmbedCoalescer, PendingEmbedding
from smallfirst.small_worker.inference_client import (
    Embeddings,
    InferenceCancelled,
    InferenceDeadlineExceeded,
    InferenceUnavailable,
)

MODEL = "all-minilm-l6-v2"
# Longer than any test runs: only the fake clock ever lets a batch's wait pass.
FOREVER_S = 3600.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingEmbed:
    """Answers each text with the vector (len(text), 1) and len(text) tokens; records each call.

    `hold()` makes the next calls wait until `release()`; `entered` is set once a call has begun."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.timeouts_s: list[float] = []
        self.entered = threading.Event()
        self._gate = threading.Event()
        self._gate.set()
        self.error: Exception | None = None
        self._lock = threading.Lock()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, model: str, texts: Sequence[str], timeout_s: float) -> Embeddings:
        with self._lock:
            self.calls.append(tuple(texts))
            self.timeouts_s.append(timeout_s)
        self.entered.set()
        assert self._gate.wait(30), "a held call was never released"
        if self.error is not None:
            raise self.error
        counts = tuple(len(t) for t in texts)
        vectors = np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)
        return Embeddings(vectors=vectors, prompt_tokens=sum(counts), model=model, token_counts=counts)


@pytest.fixture
def recording_embed() -> RecordingEmbed:
    return RecordingEmbed()


@pytest.fixture
def fake_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_coalescer(recording_embed: RecordingEmbed, fake_clock: FakeClock) -> Iterator[Callable[..., EmbedCoalescer]]:
    made: list[EmbedCoalescer] = []

    def make(**settings: Any) -> EmbedCoalescer:
        coalescer = EmbedCoalescer(recording_embed, CoalescerSettings(**settings), clock=fake_clock)
        made.append(coalescer)
        return coalescer

    yield make
    for coalescer in made:
        coalescer.close()


def submit_all(coalescer: EmbedCoalescer, texts: Sequence[str], timeout_s: float = 60.0) -> list[PendingEmbedding]:
    return [coalescer.submit(MODEL, text, timeout_s=timeout_s) for text in texts]


def test_a_batch_is_sent_once_it_holds_max_batch_texts_and_never_more(make_coalescer, recording_embed) -> None:
    # given: batches of at most 3 texts, that would otherwise wait for ever
    coalescer = make_coalescer(max_batch=3, max_wait_s=FOREVER_S, max_in_flight=4, flush_when_idle=False)

    # when: seven texts arrive
    pending = submit_all(coalescer, ["a", "bb", "ccc", "dddd", "eeeee", "ffffff", "g"])
    first_six = [p.result() for p in pending[:6]]

    # then: two full calls of three texts each; the seventh still waits for company
    assert sorted(recording_embed.calls) == [("a", "bb", "ccc"), ("dddd", "eeeee", "ffffff")]
    assert [r.vector[0] for r in first_six] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [r.prompt_tokens for r in first_six] == [1, 2, 3, 4, 5, 6]
    assert not pending[6].done()


def test_texts_are_gathered_while_the_first_waits_and_sent_together_when_the_wait_passes(
        make_coalescer, recording_embed, fake_clock) -> None:
    # given: room for 10 texts and a wait of 5 ms
    coalescer = make_coalescer(max_batch=10, max_wait_s=0.005, max_in_flight=4, flush_when_idle=False)

    # when: two texts arrive within the wait, then the wait passes
    pending = submit_all(coalescer, ["first", "second"])
    fake_clock.now += 0.005
    coalescer.wake()
    results = [p.result() for p in pending]

    # then: they went in one call, each with its own vector
    assert recording_embed.calls == [("first", "second")]
    assert [r.vector[0] for r in results] == [5.0, 6.0]


def test_a_lone_text_goes_at_once_when_no_call_is_in_flight_and_later_ones_gather_behind_a_running_call(
        make_coalescer, recording_embed) -> None:
    # given: flushing when idle, one call at a time, a wait that never passes
    coalescer = make_coalescer(max_batch=10, max_wait_s=FOREVER_S, max_in_flight=1, flush_when_idle=True)
    recording_embed.hold()

    # when: a text arrives at a quiet time, then two more while its call runs
    first = coalescer.submit(MODEL, "one", timeout_s=60)
    assert recording_embed.entered.wait(30)
    later = submit_all(coalescer, ["two", "three"])
    recording_embed.release()
    results = [first.result(), *(p.result() for p in later)]

    # then: the first went alone; the two others shared the next call
    assert recording_embed.calls == [("one",), ("two", "three")]
    assert [r.vector[0] for r in results] == [3.0, 3.0, 5.0]


def test_a_text_whose_deadline_passed_before_its_batch_closed_is_failed_and_not_sent(
        make_coalescer, recording_embed, fake_clock) -> None:
    # given: batches of two; a text with a 1 s deadline
    coalescer = make_coalescer(max_batch=2, max_wait_s=FOREVER_S, max_in_flight=4, flush_when_idle=False)
    late = coalescer.submit(MODEL, "late", timeout_s=1.0)

    # when: 2 s pass before a second text fills the batch
    fake_clock.now += 2.0
    timely = coalescer.submit(MODEL, "timely", timeout_s=10.0)

    # then: only the timely text was sent, with its own deadline; the late one failed alone
    assert timely.result().vector[0] == 6.0
    with pytest.raises(InferenceDeadlineExceeded):
        late.result()
    assert recording_embed.calls == [("timely",)]
    assert recording_embed.timeouts_s == [pytest.approx(10.0)]


def test_a_waiter_whose_deadline_passes_during_the_call_gives_up_and_the_others_get_their_results(
        make_coalescer, recording_embed, fake_clock) -> None:
    # given: a call in flight for a text with a 1 s deadline and one with 60 s
    coalescer = make_coalescer(max_batch=2, max_wait_s=FOREVER_S, max_in_flight=4, flush_when_idle=False)
    recording_embed.hold()
    short, long = coalescer.submit(MODEL, "short", timeout_s=1.0), coalescer.submit(MODEL, "long", timeout_s=60.0)
    assert recording_embed.entered.wait(30)

    # when: the short deadline passes while the call runs, then the call answers
    fake_clock.now += 1.5
    with pytest.raises(InferenceDeadlineExceeded):
        short.result()
    recording_embed.release()

    # then: the call was made for both, with the later deadline; the other text has its result
    assert long.result().vector[0] == 4.0
    assert recording_embed.timeouts_s == [pytest.approx(60.0)]


def test_a_cancelled_text_leaves_its_batch_and_frees_its_place(make_coalescer, recording_embed) -> None:
    # given: batches of three; two texts wait
    coalescer = make_coalescer(max_batch=3, max_wait_s=FOREVER_S, max_in_flight=4, flush_when_idle=False)
    gone, kept = submit_all(coalescer, ["gone", "kept"])

    # when: the first is cancelled, then two more arrive
    assert gone.cancel()
    others = submit_all(coalescer, ["x", "yy"])

    # then: the call holds the three others; the cancelled one says so
    assert [p.result().vector[0] for p in (kept, *others)] == [4.0, 1.0, 2.0]
    assert recording_embed.calls == [("kept", "x", "yy")]
    with pytest.raises(InferenceCancelled):
        gone.result()
    assert not gone.cancel()


def test_an_error_of_the_batch_call_reaches_every_waiter_of_that_batch_only(make_coalescer, recording_embed) -> None:
    # given: batches of two; the service is down for the first call
    coalescer = make_coalescer(max_batch=2, max_wait_s=FOREVER_S, max_in_flight=1, flush_when_idle=False)
    recording_embed.error = InferenceUnavailable("UNAVAILABLE: no replica")
    failed = submit_all(coalescer, ["a", "b"])

    # when: the service is back for the next batch
    errors = []
    for pending in failed:
        with pytest.raises(InferenceUnavailable) as caught:
            pending.result()
        errors.append(caught.value)
    recording_embed.error = None
    served = submit_all(coalescer, ["c", "dd"])

    # then: both waiters of the failed call have its error; the next batch is served
    assert [str(e) for e in errors] == ["UNAVAILABLE: no replica"] * 2
    assert [p.result().vector[0] for p in served] == [1.0, 2.0]


def test_texts_naming_one_scorer_are_scored_with_one_call_of_it_per_batch(make_coalescer, recording_embed) -> None:
    # given: a scorer that records the matrices it is given
    coalescer = make_coalescer(max_batch=3, max_wait_s=FOREVER_S, max_in_flight=4, flush_when_idle=False)
    seen: list[np.ndarray] = []

    def scorer(queries: np.ndarray) -> np.ndarray:
        seen.append(queries.copy())
        return queries * 10

    # when: two texts name it and one does not
    pending = [coalescer.submit(MODEL, "ab", timeout_s=60, scorer=scorer),
               coalescer.submit(MODEL, "plain", timeout_s=60),
               coalescer.submit(MODEL, "abcd", timeout_s=60, scorer=scorer)]
    results = [p.result() for p in pending]

    # then: one call of the scorer with both rows; each text has its own row of scores
    assert len(seen) == 1
    assert seen[0].tolist() == [[2.0, 1.0], [4.0, 1.0]]
    assert [None if r.scores is None else r.scores.tolist() for r in results] == [[20.0, 10.0], None, [40.0, 10.0]]

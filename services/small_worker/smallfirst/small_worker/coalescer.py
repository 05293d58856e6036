"""Coalescing of embedding requests: the texts that concurrent jobs of one worker process want
embedded are gathered for a few milliseconds into one batched `Embed` call.

Each job thread would otherwise make its own call of one text, and a short call costs the inference
service (and the worker) a fixed overhead that is larger than the embedding itself. Here a job
thread `submit`s its text and waits on its own `PendingEmbedding`; one dispatcher thread closes a
batch of one model's texts when

- it holds `max_batch` texts, or
- its first text has waited `max_wait_s`, or
- no call of that model is in flight (`flush_when_idle`): a lone job at a quiet time pays no wait,
  and under load the texts that arrive while a call runs form the next batch;

and as long as fewer than `max_in_flight` calls run at once (otherwise the batch keeps growing).
The call runs on a small pool of call threads, so batches overlap.

Each text keeps its own deadline and can be cancelled: a cancelled text leaves the batch it waits
in, a text whose deadline has passed when its batch closes is failed with
`InferenceDeadlineExceeded` and not sent, and a waiter that gives up (deadline, cancel) ignores a
result that comes later. The call's deadline is the latest of its texts'. An error of the call is
every waiter's error; the others of later batches are untouched.

After the call, the texts of a batch that name the same `scorer` (a function from a matrix of query
vectors to a matrix of per-query scores, e.g. a task's label probabilities) are scored with one
call of it on the call thread: one matrix product for the batch instead of one per job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from smallfirst.small_worker.inference_client import (
    Embeddings,
    InferenceCancelled,
    InferenceDeadlineExceeded,
    InferenceError,
    InferenceFailed,
)

log = logging.getLogger(__name__)

# (model, texts, timeout_s) -> the embeddings of texts, in order: InferenceClient.embed with truncation.
EmbedCall = Callable[[str, Sequence[str], float], Embeddings]
# (queries, dimensions) -> (queries, anything): applied once per batch to the rows that name it.
BatchScorer = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class CoalescerSettings:
    max_batch: int = 64
    max_wait_s: float = 0.003
    max_in_flight: int = 2
    flush_when_idle: bool = True

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_in_flight < 1 or self.max_wait_s < 0:
            raise ValueError(f"invalid coalescer settings: {self}")


@dataclass(frozen=True)
class EmbeddedText:
    vector: np.ndarray  # (dimensions,) float32, unit length
    prompt_tokens: int
    model: str
    # The row of the batch's scores for this text, when it named a scorer.
    scores: np.ndarray | None = None


@dataclass(eq=False)
class PendingEmbedding:
    """One text waiting for its embedding; `result()` waits, `cancel()` gives up."""

    model: str
    text: str
    deadline: float  # on the coalescer's clock
    scorer: BatchScorer | None
    _owner: EmbedCoalescer
    _done: threading.Event = field(default_factory=threading.Event)
    _result: EmbeddedText | None = None
    _error: InferenceError | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> bool:
        """Give up on this text: it leaves its batch if that has not been sent, and a result that
        comes later is ignored. False when it had already ended."""
        return self._owner._cancel(self)

    def result(self) -> EmbeddedText:
        """The embedding; raises the call's error, InferenceDeadlineExceeded once the deadline has
        passed (the text is then cancelled), or InferenceCancelled."""
        remaining = self.deadline - self._owner.clock()
        if not self._done.wait(max(0.0, remaining)):
            self._owner._fail(self, InferenceDeadlineExceeded(
                f"no embedding from {self.model} within the deadline", grpc.StatusCode.DEADLINE_EXCEEDED))
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class EmbedCoalescer:
    """Thread-safe; one per worker process, shared by its job threads. Its threads start on the
    first `submit`, in the process that submits (never before a fork)."""

    def __init__(self, embed: EmbedCall, settings: CoalescerSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._embed = embed
        self.settings = settings or CoalescerSettings()
        self.clock = clock
        self._cond = threading.Condition()
        self._queues: dict[str, list[PendingEmbedding]] = {}
        self._first_at: dict[str, float] = {}
        self._in_flight: dict[str, int] = {}
        self._calls: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None
        self._closed = False

    # ---- callers ----------------------------------------------------------------------------------
    def submit(self, model: str, text: str, *, timeout_s: float, scorer: BatchScorer | None = None) -> PendingEmbedding:
        item = PendingEmbedding(model=model, text=text, deadline=self.clock() + timeout_s, scorer=scorer, _owner=self)
        with self._cond:
            if self._closed:
                raise InferenceCancelled("the embedding coalescer is closed")
            self._start_locked()
            queue = self._queues.setdefault(model, [])
            if not queue:
                self._first_at[model] = self.clock()
            queue.append(item)
            self._cond.notify_all()
        return item

    def embed(self, model: str, text: str, *, timeout_s: float, scorer: BatchScorer | None = None) -> EmbeddedText:
        return self.submit(model, text, timeout_s=timeout_s, scorer=scorer).result()

    def wake(self) -> None:
        """Look at the batches again now (after a change of the clock, for tests)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            waiting = [item for queue in self._queues.values() for item in queue]
            self._queues.clear()
            self._cond.notify_all()
        for item in waiting:
            self._fail(item, InferenceCancelled("the embedding coalescer is closed"))
        if self._calls is not None:
            self._calls.shutdown(wait=False)

    # ---- items ------------------------------------------------------------------------------------
    def _cancel(self, item: PendingEmbedding) -> bool:
        return self._fail(item, InferenceCancelled(f"embedding request to {item.model} cancelled"))

    def _fail(self, item: PendingEmbedding, error: InferenceError) -> bool:
        with self._cond:
            if item._done.is_set():
                return False
            queue = self._queues.get(item.model)
            if queue is not None and item in queue:
                queue.remove(item)
            item._error = error
            item._done.set()
            return True

    def _succeed(self, item: PendingEmbedding, result: EmbeddedText) -> None:
        with self._cond:
            if item._done.is_set():
                return  # gave up meanwhile
            item._result = result
            item._done.set()

    # ---- dispatch ---------------------------------------------------------------------------------
    def _start_locked(self) -> None:
        if self._dispatcher is None:
            self._calls = ThreadPoolExecutor(self.settings.max_in_flight, thread_name_prefix="embed-call")
            self._dispatcher = threading.Thread(target=self._dispatch, name="embed-coalescer", daemon=True)
            self._dispatcher.start()

    def _ready_locked(self, model: str, now: float) -> bool:
        queue = self._queues.get(model)
        if not queue:
            return False
        in_flight = self._in_flight.get(model, 0)
        if in_flight >= self.settings.max_in_flight:
            return False
        return (len(queue) >= self.settings.max_batch
                or now >= self._first_at[model] + self.settings.max_wait_s
                or (self.settings.flush_when_idle and in_flight == 0))

    def _next_wait_locked(self, now: float) -> float | None:
        waits = [self._first_at[model] + self.settings.max_wait_s - now
                 for model, queue in self._queues.items()
                 if queue and self._in_flight.get(model, 0) < self.settings.max_in_flight]
        return max(0.0, min(waits)) if waits else None

    def _dispatch(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    now = self.clock()
                    model = next((m for m in self._queues if self._ready_locked(m, now)), None)
                    if model is not None:
                        break
                    self._cond.wait(self._next_wait_locked(now))
                queue = self._queues[model]
                batch, rest = queue[:self.settings.max_batch], queue[self.settings.max_batch:]
                self._queues[model] = rest
                if rest:
                    self._first_at[model] = now
                live = [item for item in batch if item.deadline > now]
                expired = [item for item in batch if item.deadline <= now]
                if live:
                    self._in_flight[model] = self._in_flight.get(model, 0) + 1
            for item in expired:
                self._fail(item, InferenceDeadlineExceeded(f"deadline passed before the call to {model}",
                                                           grpc.StatusCode.DEADLINE_EXCEEDED))
            if live:
                assert self._calls is not None
                try:
                    self._calls.submit(self._call, model, live)
                except RuntimeError:  # shut down: close() fails what is left
                    self._end_call(model, live, InferenceCancelled("the embedding coalescer is closed"))

    def _call(self, model: str, batch: list[PendingEmbedding]) -> None:
        error: InferenceError | None = None
        try:
            timeout_s = max(item.deadline for item in batch) - self.clock()
            embedded = self._embed(model, [item.text for item in batch], timeout_s)
            results = _results(embedded, batch)
        except InferenceError as exc:
            error = exc
        except Exception as exc:  # a bug in a scorer or the client: every waiter must hear of it
            log.exception("embedding batch of %d text(s) for %s failed", len(batch), model)
            error = InferenceFailed(f"embedding batch failed: {type(exc).__name__}: {exc}")
        else:
            for item, result in zip(batch, results, strict=True):
                self._succeed(item, result)
        self._end_call(model, batch, error)

    def _end_call(self, model: str, batch: list[PendingEmbedding], error: InferenceError | None) -> None:
        if error is not None:
            for item in batch:
                self._fail(item, error)
        with self._cond:
            self._in_flight[model] -= 1
            self._cond.notify_all()


def _results(embedded: Embeddings, batch: list[PendingEmbedding]) -> list[EmbeddedText]:
    vectors = embedded.vectors
    if vectors.shape[0] != len(batch):
        raise InferenceFailed(f"asked for {len(batch)} embeddings, got {vectors.shape[0]}")
    counts = embedded.token_counts or _split_tokens(embedded.prompt_tokens, len(batch))
    scores: list[np.ndarray | None] = [None] * len(batch)
    groups: dict[int, list[int]] = {}
    for row, item in enumerate(batch):
        if item.scorer is not None:
            groups.setdefault(id(item.scorer), []).append(row)
    for rows in groups.values():
        scorer = batch[rows[0]].scorer
        assert scorer is not None
        matrix = scorer(vectors[rows])
        for i, row in enumerate(rows):
            scores[row] = matrix[i]
    return [EmbeddedText(vector=vectors[row], prompt_tokens=int(counts[row]), model=embedded.model,
                         scores=scores[row]) for row in range(len(batch))]


def _split_tokens(total: int, parts: int) -> list[int]:
    """A server that reports only the batch's total: shared out evenly, summing to the total."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]

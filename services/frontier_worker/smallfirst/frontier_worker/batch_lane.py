"""Batch mode wired to jobs: a frontier attempt in batch mode is claimed and buffered in one
transaction, sent in a Message Batch, and ended by its result through the same outcome function and
compare-and-set as a realtime answer (`JobExecution.finish`).

- `BatchLane.submit` begins the attempt (CAS) with the batch lease and adds its request to the
  buffer in the same MULTI: the attempt exists exactly when its request is buffered, so a crash can
  neither lose the request nor send one for an attempt that does not exist.
- `BatchLane.run_once` (the pool's batch thread, `BatchLaneThread`) withdraws cancelled jobs'
  requests, reconciles intents left by a crashed submitter, sends due batches and polls the ones in
  flight (`frontier_worker/batches.py` records every step in Redis).
- `BatchLane.handle` turns one result into an `AttemptResult` (billed at the batch price, validated
  like a realtime answer) and calls `finish` with the batch's "handled" mark as an effect of the
  same transaction; a re-ask's next attempt goes into the buffer in that transaction too.
- `use_batch` is the policy: a job routed to batch mode is batched until `max_tries` batched tries
  failed or too little time is left before its deadline; then its attempts run in real time.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import redis

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import StructuredOutputMode, Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.execution import AttemptContext, JobExecution
from smallfirst.common.jobs import AttemptOutcome, FrontierMode, Job, Tier, Usage, Verdict
from smallfirst.common.metrics import FrontierMetrics, default_frontier_metrics
from smallfirst.common.outcome import AttemptResult, Outcome
from smallfirst.common.pricing import PriceTable, UnknownModelPrice
from smallfirst.common.store import CorruptJob, JobNotFound
from smallfirst.common.validation import validate
from smallfirst.frontier_worker.batches import (
    BatchBuffer,
    BatchPoller,
    BatchResult,
    ResultHandler,
    ResultType,
    mark_handled,
    parse_custom_id,
)
from smallfirst.frontier_worker.errors import FrontierBadRequest, FrontierBatchFailed, FrontierConfigurationError
from smallfirst.frontier_worker.executor import parse_answer
from smallfirst.frontier_worker.prompts import AnswerShape, EscalationContext, FrontierRequest, build_request

log = logging.getLogger(__name__)

# Errored results of these API error types are final (the request itself is wrong); others are retried.
FINAL_ERROR_TYPES = frozenset({"invalid_request_error", "authentication_error", "permission_error",
                               "not_found_error", "request_too_large"})
CANCEL_REQUESTS_PER_ROUND = 500


@dataclass(frozen=True)
class BatchPolicy:
    lease_s: float
    max_tries: int
    min_time_left_s: float


def failed_batched_tries(job: Job) -> int:
    return sum(1 for a in job.attempts if a.batched and a.tier is Tier.FRONTIER
               and a.outcome in (AttemptOutcome.RETRIED, AttemptOutcome.ABANDONED))


def use_batch(job: Job, policy: BatchPolicy, now: float) -> bool:
    """Whether the job's next frontier attempt goes in a batch."""
    if job.route.frontier_mode is not FrontierMode.BATCH:
        return False
    if failed_batched_tries(job) >= policy.max_tries:
        return False
    return job.deadline_at is None or job.deadline_at - now >= policy.min_time_left_s


def escalation_context(job: Job) -> EscalationContext | None:
    small = [a for a in job.attempts if a.tier is Tier.SMALL and a.ended_at is not None]
    if not small:
        return None
    return EscalationContext(small_answer=small[-1].answer, reasons=list(job.escalation_reasons))


def batch_shape(task: Task) -> AnswerShape:
    """A forced tool unless the task asks for native structured outputs: a batched request cannot
    fall back when a model refuses native output, and the tool works on every model."""
    return AnswerShape.NATIVE if task.frontier.structured_output is StructuredOutputMode.NATIVE else AnswerShape.TOOL


def batch_request(task: Task, job: Job) -> FrontierRequest:
    return build_request(task, job.input, escalation_context(job), batch_shape(task))


def shadow_request(task: Task, job: Job) -> FrontierRequest:
    """A shadow sample's request: the job's input alone (the frontier answers it afresh, without the
    small tier's answer), shaped as every batched request."""
    return build_request(task, job.input, None, batch_shape(task))


def batch_params(request: FrontierRequest) -> dict[str, Any]:
    params = request.create_kwargs()
    params.pop("timeout", None)  # an SDK option, not a Messages parameter
    return params


# Takes a batched shadow sample's answer: (task, job, answer, cost at the batch price, the verdict
# on it, effects for the same transaction). `ShadowRunner.record`.
ShadowRecorder = Callable[[Task, Job, Any, float, Verdict | None, Callable[[Any], None]], None]


class BatchLane:
    """The frontier pool's batch mode; one per worker process, safe to share between its threads."""

    def __init__(self, execution: JobExecution, buffer: BatchBuffer, prices: PriceTable, policy: BatchPolicy, *,
                 make_poller: Callable[[ResultHandler], BatchPoller],
                 metrics: FrontierMetrics | None = None, clock: Callable[[], float] = time.time,
                 shadow_recorder: ShadowRecorder | None = None) -> None:
        self.execution = execution
        self.shadow_recorder = shadow_recorder
        self.buffer = buffer
        self.prices = prices
        self.policy = policy
        self.poller = make_poller(self.handle)
        self._metrics = default_frontier_metrics() if metrics is None else metrics
        self._clock = clock

    @property
    def _redis(self) -> redis.Redis:
        return self.execution.store.redis

    # ---- Submitting -----------------------------------------------------------------------------
    def wants(self, job_id: str) -> bool:
        """Whether this delivery's attempt goes in a batch (read before the claim; the claim decides)."""
        try:
            job = self.execution.store.get(job_id)
        except (JobNotFound, CorruptJob):
            return False  # `begin` reports it
        return use_batch(job, self.policy, self._clock())

    def submit(self, job_id: str, task_id: str) -> AttemptContext | None:
        """Claim a batched attempt and buffer its request, in one transaction."""
        task_of = self.execution.catalog.get

        def buffer_request(pipe: Any, _old: Job, new: Job) -> None:
            task = task_of(new.task)
            assert task is not None, "begin checked the task"
            self.buffer.add_to(pipe, new.id, new.attempts[-1].number, batch_params(batch_request(task, new)))

        ctx = self.execution.begin(job_id, Tier.FRONTIER, task_id, lease_s=self.policy.lease_s, batched=True,
                                   effects=buffer_request)
        if ctx is not None:
            log.info("job %s: attempt %s buffered for a batch", job_id, ctx.attempt_number)
        return ctx

    # ---- Results ------------------------------------------------------------------------------
    def handle(self, result: BatchResult) -> None:
        """End the job attempt `result` answers; the poller's "handled" mark rides on its transaction."""
        job_id, number = parse_custom_id(result.custom_id)
        try:
            job = self.execution.store.get(job_id)
        except (JobNotFound, CorruptJob):
            log.warning("batch result %s: job %s is gone; dropped", result.custom_id, job_id)
            return
        task = self.execution.catalog.get(job.task)
        if task is not None and number == k.BATCH_SHADOW_ATTEMPT:
            self._handle_shadow(task, job, result)
            return
        if task is None or not 1 <= number <= len(job.attempts):
            log.warning("batch result %s: no such attempt (or task) on the job; dropped", result.custom_id)
            return
        attempt = job.attempts[number - 1]
        ctx = AttemptContext(job=job, task=task, tier=Tier.FRONTIER, attempt_number=number, task_id=attempt.task_id)
        attempt_result = self.attempt_result(task, job, result)

        def effects(pipe: Any, _old: Job, new: Job) -> None:
            mark_handled(pipe, result.batch_id, result.custom_id, self.buffer.config.record_ttl_s)
            reask = new.open_attempt()
            if reask is not None and reask.number > number and reask.task_id == attempt.task_id and reask.batched:
                self.buffer.add_to(pipe, new.id, reask.number, batch_params(batch_request(task, new)))

        outcome: Outcome = self.execution.finish(ctx, attempt_result, effects=effects, lease_s=self.policy.lease_s)
        log.info("job %s: batch result %s (%s) -> %s", job_id, result.custom_id, result.type.value, outcome.kind.value)

    def _handle_shadow(self, task: Task, job: Job, result: BatchResult) -> None:
        """A shadow sample's result: recorded (with its "handled" mark) when answered; an errored or
        expired one is dropped, since a sample is a random draw and losing one biases nothing."""
        attempt_result = self.attempt_result(task, job, result, shadow_request(task, job))
        if attempt_result.error is not None or self.shadow_recorder is None:
            log.info("job %s: batched shadow sample not answered (%s); dropped", job.id,
                     attempt_result.error.code if attempt_result.error is not None else "no recorder")
            return

        def effects(pipe: Any) -> None:
            mark_handled(pipe, result.batch_id, result.custom_id, self.buffer.config.record_ttl_s)

        self.shadow_recorder(task, job, attempt_result.answer, attempt_result.cost_usd, attempt_result.verdict,
                             effects)
        log.info("job %s: batched shadow sample recorded", job.id)

    def attempt_result(self, task: Task, job: Job, result: BatchResult,
                       request: FrontierRequest | None = None) -> AttemptResult:
        """`request`: what was sent for it (default: the job's next attempt's, `batch_request`)."""
        if result.type is ResultType.SUCCEEDED and result.message is not None:
            return self._answered(task, job, result, request or batch_request(task, job))
        if result.type is ResultType.ERRORED:
            message = f"batched request errored ({result.error_type}): {result.error_message}"
            if result.error_type in FINAL_ERROR_TYPES:
                return AttemptResult.failed(FrontierBadRequest(message))
            return AttemptResult.failed(FrontierBatchFailed(message))
        return AttemptResult.failed(FrontierBatchFailed(f"batched request {result.type.value} in {result.batch_id}"))

    def _answered(self, task: Task, job: Job, result: BatchResult, request: FrontierRequest) -> AttemptResult:
        assert result.message is not None
        usage = result.usage() or Usage()
        try:
            price = self.prices.price(task.frontier.model)
        except UnknownModelPrice as exc:
            return AttemptResult.failed(FrontierConfigurationError(str(exc)))
        cost_usd = price.cost_usd(usage, batch=True)
        realtime_cost_usd = price.cost_usd(usage)
        self._metrics.record_usage(task.frontier.model, usage, cost_usd)
        answer, _parse_error = parse_answer(request, result.message)
        with telemetry.validation_span(Tier.FRONTIER.value) as span:
            verdict = validate(task, answer, None, job.input, tier=Tier.FRONTIER)
            telemetry.annotate_verdict(verdict, span)
        # The realtime price of the same tokens rides as the frontier estimate: saved by batching.
        return AttemptResult(answer=answer, usage=usage, cost_usd=cost_usd,
                             estimated_frontier_cost_usd=realtime_cost_usd, verdict=verdict)

    # ---- The lane's loop ------------------------------------------------------------------------
    def withdraw_cancelled(self) -> int:
        """Withdraw the requests of cancelled jobs: from the buffer, or by cancelling their batch when
        it carries nothing else (otherwise the job's CAS drops the result)."""
        raw = self._redis.spop(k.BATCH_CANCEL_REQUESTS_KEY, CANCEL_REQUESTS_PER_ROUND)
        members: list[Any] = list(raw) if isinstance(raw, list | set) else []
        for member in members:
            custom_id = member.decode() if isinstance(member, bytes) else str(member)
            try:
                job_id, attempt = parse_custom_id(custom_id)
                outcome = self.buffer.cancel(job_id, attempt)
            except ValueError:
                continue
            log.info("batch request %s of a cancelled job: %s", custom_id, outcome.value)
        return len(members)

    def run_once(self) -> dict[str, int]:
        withdrawn = self.withdraw_cancelled()
        reconciled = self.buffer.reconcile()
        sent = self.buffer.flush()
        handed = self.poller.poll()
        return {"withdrawn": withdrawn, "adopted": reconciled["adopted"], "restored": reconciled["restored"],
                "batches_sent": len(sent), "results": handed}


def kill_at(point: str | None, after: int) -> Callable[[str], None]:
    """A pause hook for crash tests: SIGKILL this process the `after`-th time `point` is reached."""
    reached = 0
    lock = threading.Lock()

    def pause(name: str) -> None:
        nonlocal reached
        if point is None or name != point:
            return
        with lock:
            reached += 1
            if reached >= after:
                log.critical("fault injection: SIGKILL at %s (%d)", name, reached)
                os.kill(os.getpid(), signal.SIGKILL)

    return pause


class BatchLaneThread(threading.Thread):
    """Runs the lane in every frontier worker process; the buffer's and batches' locks let one
    process at a time submit or stream a given batch."""

    def __init__(self, lane: BatchLane, interval_s: float) -> None:
        super().__init__(name="smallfirst-batch-lane", daemon=True)
        self.lane = lane
        self.interval_s = interval_s
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                counts = self.lane.run_once()
                if any(counts.values()):
                    log.info("batch lane: %s", counts)
            except (redis.RedisError, anthropic.APIError, SmallfirstError) as exc:
                # The next round tries again: every step is recorded, so nothing is lost meanwhile.
                log.warning("batch lane: %s: %s", type(exc).__name__, exc)
            except Exception:  # a bug must not stop the lane for good; it is logged with its trace
                log.exception("batch lane: unexpected error")

    def stop(self) -> None:
        self.stopping.set()

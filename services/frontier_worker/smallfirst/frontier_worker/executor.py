"""Runs one job on the frontier tier: prompt, shared rate limit, provider call with retries, answer, cost.

Retries belong to this executor, not to the SDK (the client is built with `max_retries=0`), so every
retry is counted once, waits are recorded, and the per-job budget (attempts and total wait) is
enforced in one place. 429 and 529 honour the provider's `retry-after`; other 5xx, 408, 409 and
connection failures back off exponentially with jitter; 400 and the other 4xx fail at once.

Observability: every HTTP call is counted by outcome, every response's tokens and cost, and every
wait for the shared limiter (`FrontierMetrics`); one span covers the whole answer (the SDK's own
client span per call, and a span per limiter wait, are its children).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anthropic
import redis
from anthropic.types import Message
from httpx2 import Headers
from opentelemetry.trace import Span
from opentelemetry.util.types import AttributeValue

from smallfirst.common import telemetry
from smallfirst.common.catalog import StructuredOutputMode, Task
from smallfirst.common.constants import (
    ATTR_COST_USD,
    ATTR_GEN_AI_OPERATION,
    ATTR_GEN_AI_PROVIDER,
    ATTR_GEN_AI_REQUEST_MAX_TOKENS,
    ATTR_GEN_AI_REQUEST_MODEL,
    ATTR_GEN_AI_SYSTEM,
    ATTR_PROVIDER_RETRIES,
    ATTR_RATELIMIT_WAIT_S,
    ATTR_TASK,
    GEN_AI_OPERATION_CHAT,
    GEN_AI_PROVIDER_ANTHROPIC,
    HEADER_FRONTIER_SIMULATOR,
    SPAN_FRONTIER_CALL,
    SPAN_RATELIMIT_WAIT,
)
from smallfirst.common.jobs import Usage
from smallfirst.common.metrics import OUTCOME_OK, FrontierMetrics, default_frontier_metrics, frontier_outcome
from smallfirst.common.pricing import ModelPrice, PriceTable, UnknownModelPrice
from smallfirst.frontier_worker.cancellation import ThreadClients
from smallfirst.frontier_worker.errors import (
    FrontierAuthError,
    FrontierBadRequest,
    FrontierCancelled,
    FrontierConfigurationError,
    FrontierError,
    FrontierUnavailable,
    RetryRecord,
)
from smallfirst.frontier_worker.prompts import (
    ANSWER_TOOL_NAME,
    WRAPPED_ANSWER_KEY,
    AnswerShape,
    EscalationContext,
    FrontierRequest,
    build_request,
)
from smallfirst.frontier_worker.ratelimit import RateLimitTimeout, RateLimitTooLarge, RedisRateLimiter, Reservation

__all__ = [
    "EscalationContext",
    "FrontierAnswer",
    "FrontierError",
    "FrontierExecutor",
    "RetryPolicy",
    "parse_answer",
]

# Worth another try: request timeout, conflict, rate limit (and every 5xx, 529 overloaded included).
RETRYABLE_4XX = frozenset({408, 409, 429})
AUTH_STATUSES = frozenset({401, 403})
# A retry-after is honoured in full; up to this fraction is added so that workers told the same
# retry-after do not all come back in the same instant.
RETRY_AFTER_JITTER = 0.1


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    max_wait_s: float = 120.0
    backoff_base_ms: int = 500
    backoff_max_ms: int = 30_000

    def backoff_s(self, retry_number: int, draw: float) -> float:
        """Exponential backoff with "equal jitter": half the step is fixed, half is random."""
        step_ms = min(self.backoff_max_ms, self.backoff_base_ms * 2 ** (retry_number - 1))
        return (step_ms / 2 + draw * step_ms / 2) / 1000


@dataclass(frozen=True)
class FrontierAnswer:
    # classify: {"label": ...}; extract: the parsed object; generate: the text. When the reply could
    # not be parsed (`parse_error` set), the raw text, for validation to reject.
    answer: Any
    usage: Usage
    model: str
    cost_usd: float
    request_id: str | None
    message_id: str
    stop_reason: str | None
    shape: AnswerShape
    # Failed provider calls before the one that answered, each retried once.
    retries: tuple[RetryRecord, ...]
    limiter_wait_s: float
    # Duration of the call that answered.
    latency_s: float
    # The answer came from the development simulator, not the real API.
    simulated: bool
    parse_error: str | None = None

    @property
    def provider_retries(self) -> int:
        return len(self.retries)


@dataclass
class _CallState:
    retries: list[RetryRecord]
    limiter_wait_s: float = 0.0
    waited_s: float = 0.0
    calls: int = 0
    fallbacks: int = 0


class FrontierExecutor:
    """Built once per worker process; `run` is called for every frontier job (thread-safe)."""

    def __init__(self, client: anthropic.Anthropic, limiter: RedisRateLimiter | None, prices: PriceTable,
                 retry: RetryPolicy | None = None, tool_only_models: Iterable[str] = (),
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 draw: Callable[[], float] = random.random, metrics: FrontierMetrics | None = None,
                 thread_clients: ThreadClients | None = None) -> None:
        self._client = client
        # One client per worker thread on an abortable transport, so that a cancel can cut a call.
        self.thread_clients = thread_clients
        self._limiter = limiter
        self._prices = prices
        self.retry = retry or RetryPolicy()
        # Grows when the API refuses native structured outputs for a model (auto mode falls back).
        self._tool_only_models = set(tool_only_models)
        self._sleep = sleep
        self._clock = clock
        self._draw = draw
        # The process's set on the default registry (what the pool's metrics server serves) unless given.
        self._metrics = default_frontier_metrics() if metrics is None else metrics

    def run(self, task: Task, job_input: Mapping[str, str], escalation: EscalationContext | None = None,
            cancelled: threading.Event | None = None) -> FrontierAnswer:
        """Answer one job with the task's frontier model. Raises a FrontierError subclass otherwise
        (FrontierCancelled once `cancelled` is set: no call is started or retried after it)."""
        try:
            price = self._prices.price(task.frontier.model)
        except UnknownModelPrice as exc:
            raise FrontierConfigurationError(str(exc)) from exc
        request = build_request(task, job_input, escalation, self.shape_for(task))
        attributes: dict[str, AttributeValue] = {
            ATTR_GEN_AI_OPERATION: GEN_AI_OPERATION_CHAT, ATTR_GEN_AI_PROVIDER: GEN_AI_PROVIDER_ANTHROPIC,
            ATTR_GEN_AI_SYSTEM: GEN_AI_PROVIDER_ANTHROPIC, ATTR_GEN_AI_REQUEST_MODEL: request.model,
            ATTR_GEN_AI_REQUEST_MAX_TOKENS: request.max_tokens, ATTR_TASK: task.name,
        }
        with telemetry.tracer().start_as_current_span(SPAN_FRONTIER_CALL, attributes=attributes) as span:
            try:
                answer = self._call(request, price, task.frontier.structured_output is StructuredOutputMode.AUTO,
                                    cancelled)
            except FrontierError as exc:
                _annotate_failure(span, exc)
                raise
            telemetry.annotate_gen_ai_response(usage=answer.usage, response_model=answer.model,
                                               finish_reasons=[answer.stop_reason or ""],
                                               response_id=answer.message_id, span=span)
            if span.is_recording():
                span.set_attributes({ATTR_COST_USD: answer.cost_usd, ATTR_PROVIDER_RETRIES: answer.provider_retries,
                                     ATTR_RATELIMIT_WAIT_S: answer.limiter_wait_s})
            return answer

    def shape_for(self, task: Task) -> AnswerShape:
        mode = task.frontier.structured_output
        if mode is StructuredOutputMode.TOOL:
            return AnswerShape.TOOL
        if mode is StructuredOutputMode.NATIVE:
            return AnswerShape.NATIVE
        return AnswerShape.TOOL if task.frontier.model in self._tool_only_models else AnswerShape.NATIVE

    # ---- The call loop ------------------------------------------------------------------------
    def _call(self, request: FrontierRequest, price: ModelPrice, auto_shape: bool,
              cancelled: threading.Event | None = None) -> FrontierAnswer:
        state = _CallState(retries=[])
        client = self.thread_clients.current()[0] if self.thread_clients is not None else self._client
        while True:
            _stop_if_cancelled(cancelled, state)
            reservation = self._reserve(request, state)
            state.calls += 1
            started = self._clock()
            try:
                raw = client.messages.with_raw_response.create(**request.create_kwargs())
                message = raw.parse()
            except anthropic.APIStatusError as exc:
                self._metrics.record_request(request.model, frontier_outcome(exc.status_code))
                self._release(reservation)
                if (auto_shape and request.shape is AnswerShape.NATIVE and exc.status_code == 400
                        and _refuses_native_output(exc) and not state.fallbacks):
                    # The model lacks native structured outputs: remember it, and use a forced tool.
                    self._tool_only_models.add(request.model)
                    request = request.with_shape(AnswerShape.TOOL)
                    state.fallbacks += 1
                    state.retries.append(_record(state.calls, exc.status_code, exc, None, 0.0))
                    continue
                if exc.status_code not in RETRYABLE_4XX and exc.status_code < 500:
                    raise _fatal(exc, state) from exc
                self._retry_or_give_up(state, exc.status_code, exc, _retry_after_s(exc.response.headers),
                                       exc.request_id)
            except anthropic.APIConnectionError as exc:
                self._metrics.record_request(
                    request.model, frontier_outcome(None, timed_out=isinstance(exc, anthropic.APITimeoutError)))
                self._release(reservation)
                _stop_if_cancelled(cancelled, state)
                self._retry_or_give_up(state, None, exc, None, None)
            else:
                self._metrics.record_request(request.model, OUTCOME_OK)
                if not isinstance(message, Message):  # a stream: never asked for
                    raise FrontierBadRequest("the API answered with a stream to a non-streaming request")
                return self._answer(request, price, message, raw.headers, raw.request_id, reservation, state,
                                    self._clock() - started)

    def _reserve(self, request: FrontierRequest, state: _CallState) -> Reservation | None:
        if self._limiter is None:
            return None
        try:
            with telemetry.tracer().start_as_current_span(SPAN_RATELIMIT_WAIT) as span:
                try:
                    reservation = self._limiter.acquire(request.model, request.estimated_input_tokens(),
                                                        request.max_tokens)
                except RateLimitTimeout as exc:
                    span.set_attribute(ATTR_RATELIMIT_WAIT_S, exc.waited_s)
                    raise
                span.set_attribute(ATTR_RATELIMIT_WAIT_S, reservation.wait_s)
        except RateLimitTimeout as exc:
            self._metrics.observe_ratelimit_wait(request.model, exc.waited_s)
            state.limiter_wait_s += exc.waited_s
            raise FrontierUnavailable(str(exc), retry_after_s=exc.retry_after_s, retries=tuple(state.retries),
                                      limiter_wait_s=state.limiter_wait_s) from exc
        except RateLimitTooLarge as exc:
            raise FrontierConfigurationError(str(exc), limiter_wait_s=state.limiter_wait_s) from exc
        except redis.RedisError as exc:
            # Fail closed: without the shared limiter the pool could exceed the organisation's limits.
            raise FrontierUnavailable(f"shared rate limiter unreachable: {exc}", retries=tuple(state.retries),
                                      limiter_wait_s=state.limiter_wait_s) from exc
        self._metrics.observe_ratelimit_wait(request.model, reservation.wait_s)
        state.limiter_wait_s += reservation.wait_s
        return reservation

    def _release(self, reservation: Reservation | None) -> None:
        """A failed call keeps its input estimate (it was sent) and gives its output reservation back."""
        if reservation is None or self._limiter is None:
            return
        with contextlib.suppress(redis.RedisError):  # unreconciled, the reservation expires with its window
            self._limiter.reconcile(reservation, reservation.input_tokens, 0)

    def _retry_or_give_up(self, state: _CallState, status_code: int | None, exc: anthropic.APIError,
                          retry_after_s: float | None, request_id: str | None) -> None:
        retry_number = len(state.retries) - state.fallbacks + 1
        if retry_after_s is not None:
            wait_s = retry_after_s * (1 + RETRY_AFTER_JITTER * self._draw())
        else:
            wait_s = self.retry.backoff_s(retry_number, self._draw())
        attempts_used = state.calls - state.fallbacks
        if attempts_used >= self.retry.max_attempts or state.waited_s + wait_s > self.retry.max_wait_s:
            why = (f"{attempts_used} attempt(s) made" if attempts_used >= self.retry.max_attempts
                   else f"waiting {wait_s:.2f} s more would exceed the retry budget of {self.retry.max_wait_s} s")
            raise FrontierUnavailable(
                f"frontier API unavailable, {why}; last error: {_describe(status_code, exc)}",
                retry_after_s=wait_s, status_code=status_code, request_id=request_id,
                retries=tuple(state.retries), limiter_wait_s=state.limiter_wait_s,
            ) from exc
        state.retries.append(_record(state.calls, status_code, exc, retry_after_s, wait_s))
        self._sleep(wait_s)
        state.waited_s += wait_s

    def _answer(self, request: FrontierRequest, price: ModelPrice, message: Message, headers: Headers,
                request_id: str | None, reservation: Reservation | None, state: _CallState,
                latency_s: float) -> FrontierAnswer:
        reported = message.usage
        usage = Usage(
            input_tokens=reported.input_tokens,
            output_tokens=reported.output_tokens,
            cache_creation_input_tokens=reported.cache_creation_input_tokens or 0,
            cache_read_input_tokens=reported.cache_read_input_tokens or 0,
        )
        if reservation is not None and self._limiter is not None:
            # The answer is paid for; losing the correction to Redis only costs accuracy for one window.
            with contextlib.suppress(redis.RedisError):
                # Cache reads do not count against the input-token limit; cache writes do.
                self._limiter.reconcile(reservation, usage.input_tokens + usage.cache_creation_input_tokens,
                                        usage.output_tokens)
        answer, parse_error = parse_answer(request, message)
        cost_usd = price.cost_usd(usage)
        # Every response is paid for, also one that validation rejects later.
        self._metrics.record_usage(request.model, usage, cost_usd)
        return FrontierAnswer(
            answer=answer,
            usage=usage,
            model=message.model,
            cost_usd=cost_usd,
            request_id=request_id,
            message_id=message.id,
            stop_reason=message.stop_reason,
            shape=request.shape,
            retries=tuple(state.retries),
            limiter_wait_s=state.limiter_wait_s,
            latency_s=latency_s,
            simulated=headers.get(HEADER_FRONTIER_SIMULATOR) == "true",
            parse_error=parse_error,
        )


def _stop_if_cancelled(cancelled: threading.Event | None, state: _CallState) -> None:
    if cancelled is not None and cancelled.is_set():
        raise FrontierCancelled("the job was cancelled; its frontier call was cut and is not retried",
                                retries=tuple(state.retries), limiter_wait_s=state.limiter_wait_s)


def _annotate_failure(span: Span, exc: FrontierError) -> None:
    if not span.is_recording():
        return
    span.set_attributes({ATTR_PROVIDER_RETRIES: len(exc.retries), ATTR_RATELIMIT_WAIT_S: exc.limiter_wait_s})
    telemetry.record_error(exc.code, str(exc), span)


def parse_answer(request: FrontierRequest, message: Message) -> tuple[Any, str | None]:
    """(answer, None), or (raw text, why it could not be parsed)."""
    text = "".join(block.text for block in message.content if block.type == "text")
    truncated = message.stop_reason == "max_tokens"
    if request.shape is AnswerShape.TEXT:
        return text, None
    if request.shape is AnswerShape.TOOL:
        for block in message.content:
            if block.type == "tool_use" and block.name == ANSWER_TOOL_NAME:
                if truncated:
                    return json.dumps(block.input), "the tool call was cut off at max_tokens"
                value: Any = block.input
                if request.wrapped:
                    if not isinstance(value, dict) or WRAPPED_ANSWER_KEY not in value:
                        return json.dumps(value), f"the tool input lacks {WRAPPED_ANSWER_KEY!r}"
                    value = value[WRAPPED_ANSWER_KEY]
                return value, None
        return text, "the reply holds no call of the answer tool"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        cause = "cut off at max_tokens" if truncated else f"not JSON ({exc.msg} at {exc.pos})"
        return text, f"the structured answer is {cause}"


def _refuses_native_output(exc: anthropic.APIStatusError) -> bool:
    message = (exc.api_message or str(exc)).lower()
    return "output_config" in message or "structured output" in message or "output format" in message


def _fatal(exc: anthropic.APIStatusError, state: _CallState) -> FrontierError:
    message = f"{_describe(exc.status_code, exc)}"
    kwargs: dict[str, Any] = {"status_code": exc.status_code, "request_id": exc.request_id,
                              "retries": tuple(state.retries), "limiter_wait_s": state.limiter_wait_s}
    if exc.status_code in AUTH_STATUSES:
        return FrontierAuthError(message, **kwargs)
    return FrontierBadRequest(message, **kwargs)


def _describe(status_code: int | None, exc: anthropic.APIError) -> str:
    if isinstance(exc, anthropic.APIStatusError):
        return f"{status_code} {exc.type or type(exc).__name__}: {exc.api_message or exc.message}"
    return f"{type(exc).__name__}: {exc.message}"


def _record(call: int, status_code: int | None, exc: anthropic.APIError, retry_after_s: float | None,
            wait_s: float) -> RetryRecord:
    error_type = (exc.type if isinstance(exc, anthropic.APIStatusError) else None) or type(exc).__name__
    message = exc.api_message if isinstance(exc, anthropic.APIStatusError) and exc.api_message else exc.message
    return RetryRecord(attempt=call, status_code=status_code, error_type=error_type, message=message,
                       retry_after_s=retry_after_s, wait_s=wait_s)


def _retry_after_s(headers: Headers) -> float | None:
    """The provider's retry-after in seconds: `retry-after-ms`, else `retry-after` (seconds or a date)."""
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass  # fall through to retry-after
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(float(email.utils.mktime_tz(parsed)) - time.time(), 0.0)

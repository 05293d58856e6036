"""Tracing and structured logs for every smallfirst process.

Tracing is configured only by the standard `OTEL_*` variables, read once per process by
`configure_telemetry`:

- `OTEL_TRACES_EXPORTER`: `otlp`, `console` or both (comma-separated); unset or `none` means
  tracing is off. The OpenTelemetry default would be `otlp`; here nothing is exported unless asked,
  so that a developer's laptop or a test never tries to reach a collector that is not there.
- `OTEL_EXPORTER_OTLP_PROTOCOL` (or `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`): `http/protobuf`
  (default) or `grpc`; endpoint, headers, timeout, compression and the batch processor's limits
  come from the other standard variables, which the exporters read themselves.
- `OTEL_SERVICE_NAME` overrides the service name the caller passes; `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_TRACES_SAMPLER(_ARG)` and `OTEL_PROPAGATORS` work as usual.
- `OTEL_SDK_DISABLED=true` turns tracing off whatever else is set.

When tracing is off no TracerProvider, processor or exporter is installed and no library is
instrumented: the API's no-op tracer is all that runs, so it costs nothing. The SDK and the
instrumentations are imported only when tracing is on.

Log records carry the current span's `trace_id`/`span_id` and the job being worked on (`job_id`,
from `job_context`), in JSON lines by default.
"""

from __future__ import annotations

import contextlib
import json as jsonlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import TYPE_CHECKING, Any, TextIO

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_span_id, format_trace_id
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from smallfirst.common import constants as k
from smallfirst.common.errors import ConfigurationError

if TYPE_CHECKING:
    from smallfirst.common.jobs import Attempt, Job, Usage, Verdict

log = logging.getLogger(__name__)

TRACER_NAME = "smallfirst"
EXPORTER_OTLP = "otlp"
EXPORTER_CONSOLE = "console"
EXPORTER_NONE = "none"
PROTOCOL_HTTP = "http/protobuf"
PROTOCOL_GRPC = "grpc"
# Probes and scrapes would otherwise make most of the spans of an idle API.
DEFAULT_FASTAPI_EXCLUDED_URLS = "/metrics,/healthz,/readyz,/livez"


class TelemetryConfigError(ConfigurationError, ValueError):
    """An OTEL_* variable names an exporter or protocol this service does not support."""


@dataclass(frozen=True)
class TracingConfig:
    service_name: str
    exporters: tuple[str, ...]  # empty: tracing off
    otlp_protocol: str

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def tracing_config_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> TracingConfig:
    """Read the standard OTEL_* variables; raises TelemetryConfigError on a value we cannot honour."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_SERVICE_NAME", "").strip() or service_name
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or PROTOCOL_HTTP).strip().lower()
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return TracingConfig(name, (), protocol)
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", EXPORTER_NONE).split(",") if n.strip()]
    if not names or names == [EXPORTER_NONE]:
        return TracingConfig(name, (), protocol)
    unknown = [n for n in names if n not in {EXPORTER_OTLP, EXPORTER_CONSOLE}]
    if unknown:
        raise TelemetryConfigError(
            f"OTEL_TRACES_EXPORTER={env.get('OTEL_TRACES_EXPORTER')!r}: unsupported exporter(s) {unknown}; "
            f"use {EXPORTER_OTLP!r}, {EXPORTER_CONSOLE!r} or {EXPORTER_NONE!r}")
    if EXPORTER_OTLP in names and protocol not in {PROTOCOL_HTTP, PROTOCOL_GRPC}:
        raise TelemetryConfigError(
            f"OTLP protocol {protocol!r} is not supported; use {PROTOCOL_HTTP!r} or {PROTOCOL_GRPC!r}")
    return TracingConfig(name, tuple(dict.fromkeys(names)), protocol)


@dataclass
class Telemetry:
    """What `configure_telemetry` set up in this process."""

    config: TracingConfig
    # opentelemetry.sdk.trace.TracerProvider when tracing is on; typed loosely so that the SDK is
    # imported only then.
    provider: Any = None
    instrumented: set[str] = field(default_factory=set)

    @property
    def service_name(self) -> str:
        return self.config.service_name

    @property
    def tracing_enabled(self) -> bool:
        return self.provider is not None

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Export the spans still buffered (before a process ends on its own terms, e.g. os._exit)."""
        if self.provider is None:
            return True
        return bool(self.provider.force_flush(int(timeout_s * 1000)))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


_lock = threading.RLock()
_telemetry: Telemetry | None = None


def configure_telemetry(service_name: str) -> Telemetry:
    """Set up tracing for this process from the OTEL_* environment; later calls return the first result.

    Call it once per process before any instrumented client is created: in a service's entry point,
    and in a Celery worker through `install_worker_telemetry`.
    """
    global _telemetry
    with _lock:
        if _telemetry is not None:
            return _telemetry
        config = tracing_config_from_env(service_name)
        _telemetry = Telemetry(config=config, provider=_install_tracer_provider(config) if config.enabled else None)
        return _telemetry


def tracing_enabled() -> bool:
    return _telemetry is not None and _telemetry.tracing_enabled


def _install_tracer_provider(config: TracingConfig) -> Any:
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    # The sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on).
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: config.service_name}))
    if EXPORTER_OTLP in config.exporters:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(config.otlp_protocol)))
    if EXPORTER_CONSOLE in config.exporters:
        # Development: print each span as it ends rather than in batches.
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider


def _otlp_exporter(protocol: str) -> Any:
    if protocol == PROTOCOL_GRPC:
        # Installed only with the extras that carry grpcio (small worker, inference): the API and
        # the other images export over HTTP instead of failing to start.
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            log.warning("tracing: OTLP over gRPC is not installed in this image; exporting over %s instead "
                        "(set OTEL_EXPORTER_OTLP_ENDPOINT to the collector's HTTP port, usually 4318)",
                        PROTOCOL_HTTP)
        else:
            return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()


# ---- Instrumentations (each a no-op while tracing is off, and applied at most once) -------------
def _instrument_once(name: str, action: Callable[[], None]) -> bool:
    with _lock:
        if _telemetry is None or not _telemetry.tracing_enabled:
            return False
        if name not in _telemetry.instrumented:
            action()
            _telemetry.instrumented.add(name)
        return True


def instrument_celery() -> bool:
    """Publish and consume spans, with the context carried in the task message headers.

    In a worker this must run in the process that executes the tasks, after it started
    (`install_worker_telemetry` does that); in a publisher, before the first message is sent. A
    process that only publishes jobs it stored with their `traceparent` (the API) needs none:
    `Publisher` puts that in the message headers itself, and the worker continues from it."""

    def action() -> None:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()

    return _instrument_once("celery", action)


class _InTraceOnlyTracer(trace.Tracer):
    """Records a span only inside an existing trace; outside one it hands out the invalid span."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    @staticmethod
    def _in_trace(context: otel_context.Context | None) -> bool:
        return trace.get_current_span(context).get_span_context().is_valid

    def start_span(self, name: str, context: otel_context.Context | None = None,
                   kind: SpanKind = SpanKind.INTERNAL, attributes: Any = None, links: Any = None,
                   start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> Span:
        if not self._in_trace(context):
            return trace.INVALID_SPAN
        return self._tracer.start_span(name, context, kind, attributes, links, start_time, record_exception,
                                       set_status_on_exception)

    # The API types this with a private context-manager class; a plain one behaves the same.
    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,  # type: ignore[override]
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Any = None, links: Any = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Iterator[Span]:
        if not self._in_trace(context):
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, context, kind, attributes, links, start_time,
                                                record_exception, set_status_on_exception, end_on_exit) as span:
            yield span


class InTraceOnlyTracerProvider(trace.TracerProvider):
    """For instrumentations of libraries that also work in the background: their spans join the traces of
    requests and jobs, while kombu polling Redis, a pub/sub loop or a heartbeat record nothing (otherwise
    each command would be a one-span trace of its own, most of what the collector would receive)."""

    def __init__(self, provider: trace.TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Any = None) -> trace.Tracer:
        return _InTraceOnlyTracer(self._provider.get_tracer(instrumenting_module_name, instrumenting_library_version,
                                                            schema_url, attributes))


def instrument_redis() -> bool:
    """A span per Redis command or pipeline, for redis-py's blocking and asyncio clients; only inside
    a trace (a request, a job), never for background traffic (see InTraceOnlyTracerProvider)."""

    def action() -> None:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        assert _telemetry is not None
        RedisInstrumentor().instrument(tracer_provider=InTraceOnlyTracerProvider(_telemetry.provider))

    return _instrument_once("redis", action)


def instrument_httpx() -> bool:
    """Client spans (and traceparent) for httpx clients (webhook deliveries). Clients created before
    this call are not instrumented.

    Not needed for the frontier calls: the anthropic SDK (2.x, on httpx2) traces itself, one CLIENT
    span per API call named `anthropic.messages.create` with the gen_ai.* attributes, in the current
    trace and propagating it, through the globally installed provider."""

    def action() -> None:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor().instrument()

    return _instrument_once("httpx", action)


def instrument_grpc_client() -> bool:
    """Client spans and context propagation for gRPC channels, blocking and asyncio; health checks
    are left out. Channels created before this call are not instrumented."""

    def action() -> None:
        from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcInstrumentorClient, filters

        not_health = filters.negate(filters.health_check())
        GrpcInstrumentorClient(filter_=not_health).instrument()
        GrpcAioInstrumentorClient(filter_=not_health).instrument()

    return _instrument_once("grpc_client", action)


def grpc_server_interceptors() -> list[Any]:
    """Interceptors for a `grpc.aio.server(interceptors=...)`: a server span per call that continues
    the caller's trace. Empty while tracing is off. Health checks are not traced."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def instrument_fastapi(app: Any, excluded_urls: str = DEFAULT_FASTAPI_EXCLUDED_URLS) -> bool:
    """A server span per request that continues the caller's `traceparent`. Call it in the app
    factory, before the app serves its first request.

    The ASGI layer's spans for each body chunk received and sent are left out: two to four more
    spans per request, each recorded and exported, that say nothing the server span does not."""
    if not tracing_enabled():
        return False
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls=excluded_urls, exclude_spans=["receive", "send"])
    return True


def install_worker_telemetry(service_name: str, *, instrument: Sequence[Callable[[], object]] = ()) -> None:
    """Configure tracing in the process that runs a Celery worker's tasks, then instrument Celery and
    whatever `instrument` names (e.g. `instrument_redis`, `instrument_grpc_client`).

    With the prefork pool that is each child (`worker_process_init`, after the fork: an exporter's
    thread or gRPC channel does not survive a fork); with the threads and solo pools it is the worker
    process itself (`worker_init`, before the pool or any task runs).
    """
    from celery import signals

    def setup() -> None:
        configure_telemetry(service_name)
        instrument_celery()
        for action in instrument:
            action()

    @signals.worker_init.connect(weak=False)
    def on_worker_init(sender: Any = None, **_: object) -> None:
        if not _is_prefork(sender):
            setup()

    @signals.worker_process_init.connect(weak=False)
    def on_worker_process_init(**_: object) -> None:
        setup()

    @signals.worker_process_shutdown.connect(weak=False)
    def on_worker_process_shutdown(**_: object) -> None:
        # Prefork children leave through os._exit, which skips the SDK's atexit flush.
        if _telemetry is not None:
            _telemetry.force_flush()


def _is_prefork(worker: Any) -> bool:
    # At worker_init the pool is still what the command line or worker_pool named: an alias or a class.
    pool = getattr(worker, "pool_cls", None)
    return "prefork" in (pool if isinstance(pool, str) else getattr(pool, "__module__", ""))


# Celery's two INFO lines for every task it runs ("received", "succeeded in"). A job's transitions
# are already in its events, its record and the job metrics. The lines are written under the one
# handler lock that the consumer's thread shares with every job thread: with them on, a small worker
# took messages at about two thirds of the rate, so they show only when asked for.
CELERY_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def install_worker_logging(service_name: str, *, level: str = "INFO", json: bool = True,
                           task_lines: bool = False) -> None:
    """Let `configure_logging` own a Celery worker's logging: Celery configures none of its own when a
    receiver is connected to its `setup_logging` signal (and then redirects no stdout either).
    Without `task_lines`, Celery's per-task INFO lines are left out (its warnings and errors stay)."""
    from celery import signals

    @signals.setup_logging.connect(weak=False)
    def on_setup_logging(**_: object) -> None:
        configure_logging(service_name, level, json=json)
        if not task_lines:
            for name in CELERY_TASK_LOGGERS:
                logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


# ---- Trace context -------------------------------------------------------------------------------
_propagator = TraceContextTextMapPropagator()


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits (for the job resource), or None outside a trace."""
    span_context = trace.get_current_span().get_span_context()
    return format_trace_id(span_context.trace_id) if span_context.is_valid else None


def current_traceparent() -> str | None:
    """The W3C `traceparent` of the current span, to be stored with a job so that whoever publishes
    its messages later (the API's publisher thread, the sweeper) continues the job's trace."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(k.HEADER_TRACEPARENT)


@contextlib.contextmanager
def continued_trace(traceparent: str | None) -> Iterator[None]:
    """Make `traceparent` the parent of the spans started inside, unless a span is already current
    (a worker publishing from inside a job's span stays in that span's trace)."""
    if not traceparent or trace.get_current_span().get_span_context().is_valid:
        yield
        return
    # On top of the current context, so that what it holds besides the span stays in force.
    token = otel_context.attach(_propagator.extract({k.HEADER_TRACEPARENT: traceparent}, otel_context.get_current()))
    try:
        yield
    finally:
        otel_context.detach(token)


# ---- Job spans and attributes --------------------------------------------------------------------
@cache
def tracer() -> trace.Tracer:
    # A proxy until a provider is installed, and the no-op tracer if none ever is.
    return trace.get_tracer(TRACER_NAME)


job_id_var: ContextVar[str | None] = ContextVar("smallfirst_job_id", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Log records emitted inside carry `job_id` (worker threads and asyncio tasks alike)."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)


@contextlib.contextmanager
def job_span(name: str, job_id: str, *, tier: str | None = None, kind: SpanKind = SpanKind.INTERNAL,
             attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
    """A span about one job (made current), with `job_context` set for the logs inside it. An
    exception leaving the block is recorded on the span and sets its status to error."""
    if not tracing_enabled():
        with job_context(job_id):
            yield trace.INVALID_SPAN
        return
    attrs: dict[str, AttributeValue] = {k.ATTR_JOB_ID: job_id}
    if tier is not None:
        attrs[k.ATTR_TIER] = str(tier)
    if attributes:
        attrs.update(attributes)
    with job_context(job_id), tracer().start_as_current_span(name, kind=kind, attributes=attrs) as span:
        yield span


@contextlib.contextmanager
def validation_span(tier: str) -> Iterator[Span]:
    """A span around judging one answer (made current); record the verdict with `annotate_verdict`."""
    if not tracing_enabled():
        yield trace.INVALID_SPAN
        return
    with tracer().start_as_current_span(k.SPAN_VALIDATE, attributes={k.ATTR_TIER: str(tier)}) as span:
        yield span


def annotate_verdict(verdict: Verdict, span: Span | None = None) -> None:
    """Whether the answer passed and the codes of why not. A rejected answer is an outcome, not an
    error of the span: the escalation or retry that follows is the system working."""
    target = _span(span)
    if not target.is_recording():
        return
    target.set_attribute(k.ATTR_VERDICT, verdict.passed)
    if verdict.reasons:
        target.set_attribute(k.ATTR_VERDICT_REASONS, sorted({reason_code(r) for r in verdict.reasons}))


def reason_code(reason: str) -> str:
    """The machine-readable part of an escalation or validation reason ("choice: ..." -> "choice");
    the rest can quote the input or the answer, which stays out of spans and metric labels."""
    code = reason.split(":", 1)[0].strip().lower()
    cleaned = "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in code)[:48]
    return cleaned or "unknown"


def _span(span: Span | None) -> Span:
    return trace.get_current_span() if span is None else span


def annotate_job(job: Job, span: Span | None = None) -> None:
    """Set the job's attributes (and its latest attempt's) on `span`, the current span by default."""
    target = _span(span)
    if not target.is_recording():
        return
    attrs: dict[str, AttributeValue] = {
        k.ATTR_JOB_ID: job.id,
        k.ATTR_TENANT: job.tenant,
        k.ATTR_TASK: job.task,
        k.ATTR_TIER: job.current_tier.value,
        k.ATTR_ROUTE_REASON: job.route.reason.value,
        k.ATTR_JOB_STATUS: job.status.value,
        k.ATTR_JOB_PRIORITY: job.priority.value,
    }
    if job.escalation_reasons:
        attrs[k.ATTR_ESCALATION_REASON] = sorted({reason_code(r) for r in job.escalation_reasons})
    if job.error is not None:
        attrs[k.ATTR_ERROR_CODE] = job.error.code
    target.set_attributes(attrs)
    if job.attempts:
        annotate_attempt(job.attempts[-1], target)


def annotate_attempt(attempt: Attempt, span: Span | None = None) -> None:
    target = _span(span)
    if not target.is_recording():
        return
    attrs: dict[str, AttributeValue] = {
        k.ATTR_ATTEMPT: attempt.number,
        k.ATTR_TIER: attempt.tier.value,
        k.ATTR_ATTEMPT_OUTCOME: attempt.outcome.value,
        k.ATTR_GEN_AI_REQUEST_MODEL: attempt.model,
    }
    if attempt.queue_wait_ms is not None:
        attrs[k.ATTR_QUEUE_WAIT_S] = attempt.queue_wait_ms / 1000
    if attempt.confidence is not None:
        attrs[k.ATTR_CONFIDENCE] = attempt.confidence
    if attempt.verdict is not None:
        attrs[k.ATTR_VERDICT] = attempt.verdict.passed
        if attempt.verdict.reasons:
            attrs[k.ATTR_VERDICT_REASONS] = sorted({reason_code(r) for r in attempt.verdict.reasons})
    if attempt.billed:
        attrs[k.ATTR_COST_USD] = attempt.cost_usd
    if attempt.estimated_frontier_cost_usd is not None:
        attrs[k.ATTR_ESTIMATED_FRONTIER_COST_USD] = attempt.estimated_frontier_cost_usd
    if attempt.error is not None:
        attrs[k.ATTR_ERROR_CODE] = attempt.error.code
    target.set_attributes(attrs)
    annotate_usage(attempt.usage, target)


def annotate_usage(usage: Usage, span: Span | None = None) -> None:
    target = _span(span)
    if not target.is_recording():
        return
    attrs: dict[str, AttributeValue] = {
        k.ATTR_GEN_AI_INPUT_TOKENS: usage.input_tokens,
        k.ATTR_GEN_AI_OUTPUT_TOKENS: usage.output_tokens,
    }
    if usage.cache_read_input_tokens:
        attrs[k.ATTR_GEN_AI_CACHE_READ_TOKENS] = usage.cache_read_input_tokens
    if usage.cache_creation_input_tokens:
        attrs[k.ATTR_GEN_AI_CACHE_CREATION_TOKENS] = usage.cache_creation_input_tokens
    target.set_attributes(attrs)


@contextlib.contextmanager
def gen_ai_span(operation: str, provider: str, request_model: str, *, max_tokens: int | None = None,
                attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span]:
    """A client span for one model call, named and attributed per the GenAI semantic conventions
    ("chat claude-sonnet-4-5"); the HTTP or gRPC client span of the call becomes its child."""
    if not tracing_enabled():
        yield trace.INVALID_SPAN
        return
    attrs: dict[str, AttributeValue] = {
        k.ATTR_GEN_AI_OPERATION: operation,
        k.ATTR_GEN_AI_PROVIDER: provider,
        # The deprecated name as well: many backends still group GenAI spans by it.
        k.ATTR_GEN_AI_SYSTEM: provider,
        k.ATTR_GEN_AI_REQUEST_MODEL: request_model,
    }
    if max_tokens is not None:
        attrs[k.ATTR_GEN_AI_REQUEST_MAX_TOKENS] = max_tokens
    if attributes:
        attrs.update(attributes)
    with tracer().start_as_current_span(f"{operation} {request_model}", kind=SpanKind.CLIENT,
                                        attributes=attrs) as span:
        yield span


def annotate_gen_ai_response(*, usage: Usage | None = None, response_model: str | None = None,
                             finish_reasons: Sequence[str] = (), response_id: str | None = None,
                             span: Span | None = None) -> None:
    target = _span(span)
    if not target.is_recording():
        return
    if response_model:
        target.set_attribute(k.ATTR_GEN_AI_RESPONSE_MODEL, response_model)
    if finish_reasons:
        target.set_attribute(k.ATTR_GEN_AI_FINISH_REASON, list(finish_reasons))
    if response_id:
        target.set_attribute(k.ATTR_GEN_AI_RESPONSE_ID, response_id)
    if usage is not None:
        annotate_usage(usage, target)


def record_error(error_type: str, description: str = "", span: Span | None = None) -> None:
    """Mark a span failed without an exception object (an error answer, a refused request)."""
    target = _span(span)
    if not target.is_recording():
        return
    target.set_attribute(k.ATTR_ERROR_TYPE, error_type)
    target.set_status(Status(StatusCode.ERROR, description or error_type))


# ---- Structured logging --------------------------------------------------------------------------
_STANDARD_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", k.LOG_FIELD_TRACE_ID, k.LOG_FIELD_SPAN_ID, k.LOG_FIELD_JOB_ID,
    # uvicorn's copy of the message with terminal colour codes.
    "color_message"}


class TraceContextFilter(logging.Filter):
    """Stamps each record with the ids of the context it was emitted in: the current span's trace and
    span id, and the job from `job_context` (unless the call passed `extra={"job_id": ...}`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format_trace_id(span_context.trace_id)
            record.span_id = format_span_id(span_context.span_id)
        else:
            record.trace_id = None
            record.span_id = None
        if getattr(record, k.LOG_FIELD_JOB_ID, None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, service, trace_id, span_id, job_id,
    then whatever the call passed in `extra`, then the exception if any."""

    def __init__(self, service_name: str) -> None:
        super().__init__()
        self.service_name = service_name

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service_name,
            k.LOG_FIELD_TRACE_ID: getattr(record, k.LOG_FIELD_TRACE_ID, None),
            k.LOG_FIELD_SPAN_ID: getattr(record, k.LOG_FIELD_SPAN_ID, None),
            k.LOG_FIELD_JOB_ID: getattr(record, k.LOG_FIELD_JOB_ID, None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_RECORD_FIELDS and not key.startswith("_"):
                out.setdefault(key, value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """For a terminal: the usual line, with the job and trace ids when there are any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{name}={value}" for name in (k.LOG_FIELD_JOB_ID, k.LOG_FIELD_TRACE_ID)
               if (value := getattr(record, name, None))]
        return f"{line} [{' '.join(ids)}]" if ids else line


class _SmallfirstHandler(logging.StreamHandler[TextIO]):
    """Marks the handler configure_logging installed, so a second call replaces it."""


def configure_logging(service_name: str, level: str | int = "INFO", json: bool = True,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send the root logger's records to `stream` (stderr) as JSON lines (or text for a terminal)
    carrying trace_id, span_id and job_id. Replaces a handler an earlier call installed."""
    root = logging.getLogger()
    for existing in list(root.handlers):
        if isinstance(existing, _SmallfirstHandler):
            root.removeHandler(existing)
    handler = _SmallfirstHandler(sys.stderr if stream is None else stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter(service_name) if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler

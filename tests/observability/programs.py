"""Programs the observability tests run as separate processes, so that each configures telemetry from
its own environment exactly as a service does (and the test process itself stays untouched).

    python -m tests.observability.programs span-tree       # a small job trace, one JSON log line
    python -m tests.observability.programs state           # what configure_telemetry installed
    python -m tests.observability.programs publish JOB_ID [--instrumented]  # publish with the real Publisher
    python -m tests.observability.programs frontier-call URL  # one anthropic SDK call to the simulator
    python -m tests.observability.programs redis-calls URL  # Redis commands outside and inside a trace

Each prints one JSON object as its last line of stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from opentelemetry import trace

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.jobs import Job, Priority, RouteDecision, RouteReason, Tier, Usage

log = logging.getLogger("tests.observability.programs")

SERVICE = "obs-emitter"
JOB_ID = "job_trace_tree"


def span_tree() -> dict[str, object]:
    telemetry.configure_logging(SERVICE, "INFO", json=True)
    configured = telemetry.configure_telemetry(SERVICE)
    with telemetry.job_span(k.SPAN_JOB_ATTEMPT, JOB_ID, tier=Tier.FRONTIER.value) as attempt:
        with telemetry.gen_ai_span(k.GEN_AI_OPERATION_CHAT, k.GEN_AI_PROVIDER_ANTHROPIC, "claude-test",
                                   max_tokens=64):
            telemetry.annotate_gen_ai_response(usage=Usage(input_tokens=12, output_tokens=7),
                                               response_model="claude-test", finish_reasons=["end_turn"])
            log.info("model answered", extra={"model": "claude-test"})
        with telemetry.tracer().start_as_current_span(k.SPAN_VALIDATE):
            telemetry.record_error("validation_failed", "answer is not one of the choices")
        trace_id = telemetry.current_trace_id()
        attempt_span_id = trace.format_span_id(attempt.get_span_context().span_id)
    configured.force_flush()
    return {"trace_id": trace_id, "attempt_span_id": attempt_span_id, "service": configured.service_name}


def state() -> dict[str, object]:
    configured = telemetry.configure_telemetry(SERVICE)
    instrumented = [telemetry.instrument_celery(), telemetry.instrument_redis(), telemetry.instrument_httpx(),
                    telemetry.instrument_grpc_client()]
    with telemetry.job_span(k.SPAN_JOB_ATTEMPT, JOB_ID) as span:
        trace_id = telemetry.current_trace_id()
        recording = span.is_recording()
    # Checked before anything below imports more of OpenTelemetry.
    sdk_loaded = sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter",
                                                                 "opentelemetry.instrumentation")))
    return {
        "tracing_enabled": configured.tracing_enabled,
        "provider": type(trace.get_tracer_provider()).__name__,
        "instrumented": instrumented,
        "grpc_server_interceptors": len(telemetry.grpc_server_interceptors()),
        "trace_id": trace_id,
        "span_recording": recording,
        "sdk_modules_loaded": sdk_loaded,
    }


def publish(job_id: str, instrumented: bool) -> dict[str, object]:
    """Publish one small-tier job with the real Publisher from a thread where no span is current,
    after storing the submitting span's `traceparent` on the job.

    Not instrumented: the API's way (its publisher thread; Celery uninstrumented, the traceparent
    travels in the message headers). Instrumented: the sweeper's way, in a worker process where
    Celery is instrumented (a producer span continues the job's trace)."""
    import threading

    from smallfirst.common.queues import Publisher, make_celery
    from smallfirst.common.settings import CoreSettings

    configured = telemetry.configure_telemetry("obs-publisher")
    if instrumented:
        telemetry.instrument_celery()
    app = make_celery(CoreSettings())  # from SMALLFIRST_* variables
    now = time.time()
    with telemetry.tracer().start_as_current_span(k.SPAN_JOB_SUBMIT) as root:
        job = Job(id=job_id, tenant="t", task="test", input={"text": "hello"}, priority=Priority.LOW,
                  route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT), created_at=now,
                  updated_at=now, queued_at=now, traceparent=telemetry.current_traceparent())
        root_span_id = trace.format_span_id(root.get_span_context().span_id)
        trace_id = telemetry.current_trace_id()

    thread = threading.Thread(target=Publisher(app).publish_jobs, args=([job],))
    thread.start()
    thread.join()
    configured.force_flush()
    return {"trace_id": trace_id, "root_span_id": root_span_id}


def frontier_call(base_url: str) -> dict[str, object]:
    """One Messages API call through the anthropic SDK inside a frontier job attempt span."""
    import anthropic

    configured = telemetry.configure_telemetry("obs-frontier")
    client = anthropic.Anthropic(api_key="test-key", base_url=base_url, max_retries=0)
    with telemetry.job_span(k.SPAN_JOB_ATTEMPT, JOB_ID, tier=Tier.FRONTIER.value) as span:
        message = client.messages.create(model="claude-haiku-5-5", max_tokens=32,
                                         messages=[{"role": "user", "content": "Say hello."}])
        span_id = trace.format_span_id(span.get_span_context().span_id)
        trace_id = telemetry.current_trace_id()
    configured.force_flush()
    return {"trace_id": trace_id, "attempt_span_id": span_id, "message_id": message.id}


def redis_calls(redis_url: str) -> dict[str, object]:
    """A PING outside any trace (background traffic), then a SET inside a job span."""
    import redis

    configured = telemetry.configure_telemetry(SERVICE)
    telemetry.instrument_redis()
    client = redis.Redis.from_url(redis_url)
    client.ping()
    with telemetry.job_span(k.SPAN_JOB_ATTEMPT, JOB_ID) as span:
        client.set("test:obs:key", "1")
        span_id = trace.format_span_id(span.get_span_context().span_id)
    client.get("test:obs:key")
    configured.force_flush()
    return {"attempt_span_id": span_id}


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "span-tree":
        result = span_tree()
    elif mode == "state":
        result = state()
    elif mode == "publish":
        result = publish(args[0], instrumented="--instrumented" in args[1:])
    elif mode == "redis-calls":
        result = redis_calls(args[0])
    elif mode == "frontier-call":
        result = frontier_call(args[0])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

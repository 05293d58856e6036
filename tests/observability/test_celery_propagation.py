"""The trace context crosses Celery with our configuration (late acks, priority queues on Redis, the
threads pool): a real worker process continues the publisher's trace, through the escalation hop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from tests.observability import trace_worker
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.procs import ManagedProcess, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_ID = "job_celery_trace"


def _env(redis_url: str, receiver: OtlpReceiver) -> dict[str, str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    return {**base, **receiver.env(), "SMALLFIRST_REDIS_URL": redis_url,
            "SMALLFIRST_CATALOG_PATH": str(default_catalog_path())}


@pytest.fixture
def traced_worker(redis_url: str, otlp_receiver: OtlpReceiver, logs_dir: Path) -> Iterator[ManagedProcess]:
    """A Celery worker process (threads pool) with tracing on, consuming `small` and `escalation`."""
    worker = ManagedProcess("obs-trace-worker", [sys.executable, "-m", "tests.observability.trace_worker"],
                            logs_dir, env=_env(redis_url, otlp_receiver), cwd=REPO_ROOT)
    worker.start()
    try:
        worker.wait_ready(lambda: "ready" in worker.log_path.read_text(errors="replace"), timeout_s=60)
        yield worker
    finally:
        worker.stop()


def publish(job_id: str, env: dict[str, str], *options: str) -> dict[str, str]:
    proc = subprocess.run([sys.executable, "-m", "tests.observability.programs", "publish", job_id, *options],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    published: dict[str, str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return published


def test_worker_spans_continue_the_publishers_trace_across_the_escalation_hop(
        redis_url: str, otlp_receiver: OtlpReceiver, traced_worker: ManagedProcess) -> None:
    # given a traced worker, and a separate traced process that publishes like the API does
    env = _env(redis_url, otlp_receiver)

    # when the publisher sends a low-priority small job submitted inside its root span, from a thread
    # outside any span and without Celery instrumentation (the API's publisher thread)
    published = publish(JOB_ID, env)
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: client.exists(trace_worker.done_key(JOB_ID)) == 1, 60, "the escalated job to finish")

    # then every span of both processes is in the publisher's trace, each with the right parent
    def complete(spans: list[ReceivedSpan]) -> bool:
        return {f"run/{k.TASK_RUN_SMALL}", f"run/{k.TASK_RUN_FRONTIER}"} <= {s.name for s in spans} and sum(
            s.name == k.SPAN_JOB_ATTEMPT for s in spans) == 2

    spans = otlp_receiver.wait_for(complete, what="the worker's spans")
    trace_id = published["trace_id"]
    assert client.get(trace_worker.done_key(JOB_ID)) == trace_id.encode()
    in_trace = [s for s in spans if s.trace_id == trace_id]

    def one(name: str, service: str) -> ReceivedSpan:
        found = [s for s in in_trace if s.name == name and s.service_name == service]
        assert len(found) == 1, f"{service}:{name} in the trace: {found}"
        return found[0]

    run_small = one(f"run/{k.TASK_RUN_SMALL}", trace_worker.SERVICE)
    publish_escalation = one(f"apply_async/{k.TASK_RUN_FRONTIER}", trace_worker.SERVICE)
    run_frontier = one(f"run/{k.TASK_RUN_FRONTIER}", trace_worker.SERVICE)
    attempts = [s for s in in_trace if s.name == k.SPAN_JOB_ATTEMPT]
    small_attempt = next(s for s in attempts if s.attributes[k.ATTR_TIER] == "small")
    frontier_attempt = next(s for s in attempts if s.attributes[k.ATTR_TIER] == "frontier")
    redis_spans = [s for s in in_trace if s.parent_span_id == small_attempt.span_id and s.name == "INCRBY"]

    # the message carried the submitting span's context: no span per message, the submit span is the parent
    assert [s.name for s in in_trace if s.service_name == "obs-publisher"] == [k.SPAN_JOB_SUBMIT]
    assert run_small.parent_span_id == published["root_span_id"]
    assert run_small.kind == "SPAN_KIND_CONSUMER"
    assert small_attempt.parent_span_id == run_small.span_id
    assert len(redis_spans) == 1
    assert publish_escalation.parent_span_id == small_attempt.span_id
    assert publish_escalation.kind == "SPAN_KIND_PRODUCER"
    assert run_frontier.parent_span_id == publish_escalation.span_id
    assert frontier_attempt.parent_span_id == run_frontier.span_id
    assert {s.attributes[k.ATTR_JOB_ID] for s in attempts} == {JOB_ID}

    # and the worker's JSON log lines carry the trace and the job
    lines = [json.loads(line) for line in traced_worker.log_path.read_text().splitlines() if line.startswith("{")]
    escalating = next(line for line in lines if line["message"].startswith("small attempt failed validation"))
    assert escalating["trace_id"] == trace_id
    assert escalating["span_id"] == small_attempt.span_id
    assert escalating["job_id"] == JOB_ID
    assert escalating["service"] == trace_worker.SERVICE


def test_a_publish_outside_any_span_in_an_instrumented_process_continues_the_jobs_trace(
        redis_url: str, otlp_receiver: OtlpReceiver, traced_worker: ManagedProcess) -> None:
    # given a traced worker, and a traced process with Celery instrumented (a worker's sweeper)
    env = _env(redis_url, otlp_receiver)
    job_id = f"{JOB_ID}_republished"

    # when it publishes a job from a thread where no span is current
    published = publish(job_id, env, "--instrumented")
    client = redis.Redis.from_url(redis_url)
    wait_until(lambda: client.exists(trace_worker.done_key(job_id)) == 1, 60, "the job to finish")

    # then its producer span continues the job's trace from the stored traceparent, and the worker's from it
    spans = otlp_receiver.wait_for(lambda s: any(x.name == f"run/{k.TASK_RUN_SMALL}" for x in s),
                                   what="the worker's run span")
    in_trace = [s for s in spans if s.trace_id == published["trace_id"]]
    [producer] = [s for s in in_trace if s.name == f"apply_async/{k.TASK_RUN_SMALL}"]
    [run_small] = [s for s in in_trace if s.name == f"run/{k.TASK_RUN_SMALL}"]
    assert producer.service_name == "obs-publisher"
    assert producer.kind == "SPAN_KIND_PRODUCER"
    assert producer.parent_span_id == published["root_span_id"]
    assert run_small.parent_span_id == producer.span_id

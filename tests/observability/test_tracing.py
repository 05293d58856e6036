"""Tracing configured from the OTEL_* environment, exported to a real OTLP receiver, and JSON logs
that carry the trace. Each case runs `tests.observability.programs` as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from smallfirst.common import constants as k
from smallfirst.common.telemetry import TelemetryConfigError, tracing_config_from_env
from tests.frontier_fixtures import SimControl
from tests.observability import programs
from tests.support.otlp_receiver import OtlpReceiver

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_program(*args: str, env: dict[str, str]) -> tuple[dict[str, Any], str, str]:
    """Run a program with only the given OTEL_* variables (none inherited from this process)."""
    base = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    proc = subprocess.run([sys.executable, "-m", "tests.observability.programs", *args], cwd=REPO_ROOT,
                          env={**base, **env}, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"program failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout, proc.stderr


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_job_spans_arrive_at_the_receiver_with_their_parents(otlp_receiver: OtlpReceiver, protocol: str) -> None:
    # given a process whose OTEL_* variables point at the receiver
    env = otlp_receiver.env(protocol)

    # when it records a job attempt with a model call and a validation inside
    result, _, _ = run_program("span-tree", env=env)

    # then the receiver has all three spans, in one trace, with the right parents and attributes
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 3, what="the span tree")
    by_name = {s.name: s for s in spans}
    attempt, call, validate = by_name[k.SPAN_JOB_ATTEMPT], by_name["chat claude-test"], by_name[k.SPAN_VALIDATE]
    assert {s.trace_id for s in spans} == {result["trace_id"]}
    assert attempt.parent_span_id is None
    assert attempt.span_id == result["attempt_span_id"]
    assert call.parent_span_id == attempt.span_id
    assert validate.parent_span_id == attempt.span_id
    assert {s.service_name for s in spans} == {programs.SERVICE}
    assert {s.protocol for s in spans} == {"grpc" if protocol == "grpc" else "http"}
    assert attempt.attributes[k.ATTR_JOB_ID] == programs.JOB_ID
    assert attempt.attributes[k.ATTR_TIER] == "frontier"
    assert call.kind == "SPAN_KIND_CLIENT"
    assert call.attributes[k.ATTR_GEN_AI_PROVIDER] == k.GEN_AI_PROVIDER_ANTHROPIC
    assert call.attributes[k.ATTR_GEN_AI_REQUEST_MODEL] == "claude-test"
    assert call.attributes[k.ATTR_GEN_AI_INPUT_TOKENS] == 12
    assert call.attributes[k.ATTR_GEN_AI_OUTPUT_TOKENS] == 7
    assert call.attributes[k.ATTR_GEN_AI_FINISH_REASON] == ["end_turn"]
    assert validate.status_code == "STATUS_CODE_ERROR"
    assert validate.attributes[k.ATTR_ERROR_TYPE] == "validation_failed"


def test_anthropic_sdk_call_span_joins_the_job_trace_with_gen_ai_attributes(
        otlp_receiver: OtlpReceiver, frontier_sim: SimControl) -> None:
    # given a traced process and the Messages-API simulator
    env = otlp_receiver.env()

    # when it calls the simulator through the anthropic SDK inside a job attempt span
    result, _, _ = run_program("frontier-call", frontier_sim.url, env=env)

    # then the SDK's own call span is a child of the attempt, carrying the GenAI attributes
    spans = otlp_receiver.wait_for(lambda s: any(x.name == "anthropic.messages.create" for x in s),
                                   what="the SDK's call span")
    call = next(s for s in spans if s.name == "anthropic.messages.create")
    assert call.trace_id == result["trace_id"]
    assert call.parent_span_id == result["attempt_span_id"]
    assert call.kind == "SPAN_KIND_CLIENT"
    assert call.attributes[k.ATTR_GEN_AI_PROVIDER] == k.GEN_AI_PROVIDER_ANTHROPIC
    assert call.attributes[k.ATTR_GEN_AI_REQUEST_MODEL] == "claude-haiku-5-5"
    assert call.attributes[k.ATTR_GEN_AI_RESPONSE_ID] == result["message_id"]
    assert call.attributes[k.ATTR_GEN_AI_OUTPUT_TOKENS] > 0


def test_redis_commands_are_traced_only_inside_a_trace(otlp_receiver: OtlpReceiver, redis_url: str) -> None:
    # given a traced process with Redis instrumented
    env = otlp_receiver.env()

    # when it sends a command outside any trace, one inside a job span, and one after it
    result, _, _ = run_program("redis-calls", redis_url, env=env)

    # then only the command inside the job span was recorded, as its child (the program flushed
    # every span before it exited, so what is missing now was never recorded)
    spans = otlp_receiver.wait_for(lambda s: any(x.name == "SET" for x in s), what="the SET span")
    assert sorted(s.name for s in spans) == ["SET", k.SPAN_JOB_ATTEMPT]
    assert next(s for s in spans if s.name == "SET").parent_span_id == result["attempt_span_id"]


def test_otel_service_name_overrides_the_service_name(otlp_receiver: OtlpReceiver) -> None:
    # given OTEL_SERVICE_NAME set beside the exporter variables
    env = {**otlp_receiver.env(), "OTEL_SERVICE_NAME": "renamed-by-operator"}

    # when the program records its spans
    run_program("span-tree", env=env)

    # then they carry the operator's name, not the one the code passed
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 3)
    assert {s.service_name for s in spans} == {"renamed-by-operator"}


def test_log_line_carries_the_trace_id_span_id_and_job_id(otlp_receiver: OtlpReceiver) -> None:
    # given a traced process that logs JSON
    env = otlp_receiver.env()

    # when it logs inside the model call of a job attempt
    result, _, stderr = run_program("span-tree", env=env)

    # then the JSON line names the job, the trace and the span it was written in
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    record = next(line for line in lines if line["message"] == "model answered")
    call = otlp_receiver.wait_for(lambda s: any(x.name == "chat claude-test" for x in s))
    call_span = next(s for s in call if s.name == "chat claude-test")
    assert record["trace_id"] == result["trace_id"]
    assert record["span_id"] == call_span.span_id
    assert record["job_id"] == programs.JOB_ID
    assert record["service"] == programs.SERVICE
    assert record["level"] == "INFO"
    assert record["model"] == "claude-test"


@pytest.mark.parametrize("env", [
    pytest.param({}, id="no-otel-variables"),
    pytest.param({"OTEL_TRACES_EXPORTER": "none"}, id="exporter-none"),
    pytest.param({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, id="sdk-disabled"),
])
def test_tracing_off_installs_no_provider_and_instruments_nothing(env: dict[str, str]) -> None:
    # given a process without tracing configured
    # when it configures telemetry, asks for every instrumentation and opens a job span
    result, _, _ = run_program("state", env=env)

    # then no SDK provider, exporter or instrumentation was even imported, and spans do not record
    assert result["tracing_enabled"] is False
    assert result["provider"] == "ProxyTracerProvider"
    assert result["instrumented"] == [False, False, False, False]
    assert result["grpc_server_interceptors"] == 0
    assert result["trace_id"] is None
    assert result["span_recording"] is False
    assert result["sdk_modules_loaded"] == []


def test_tracing_on_installs_the_sdk_provider_and_instrumentations(otlp_receiver: OtlpReceiver) -> None:
    # given a process with the OTLP exporter configured
    # when it configures telemetry and asks for every instrumentation
    result, _, _ = run_program("state", env=otlp_receiver.env())

    # then the SDK provider is installed, every instrumentation applied, and spans record
    assert result["tracing_enabled"] is True
    assert result["provider"] == "TracerProvider"
    assert result["instrumented"] == [True, True, True, True]
    assert result["grpc_server_interceptors"] == 1
    assert result["span_recording"] is True
    assert len(result["trace_id"]) == 32


def test_console_exporter_prints_spans_to_stdout() -> None:
    # given the development exporter
    # when the program records its spans
    _, stdout, _ = run_program("span-tree", env={"OTEL_TRACES_EXPORTER": "console"})

    # then each span is printed as it ends
    assert f'"name": "{k.SPAN_JOB_ATTEMPT}"' in stdout
    assert '"name": "chat claude-test"' in stdout


@pytest.mark.parametrize(("env", "message"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unsupported exporter"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "not supported"),
])
def test_unsupported_otel_settings_are_refused_with_a_clear_error(env: dict[str, str], message: str) -> None:
    # given OTEL_* values this service cannot honour
    # when the configuration is read
    # then it is refused, naming what is wrong, instead of silently exporting nothing
    with pytest.raises(TelemetryConfigError, match=message):
        tracing_config_from_env("svc", env)

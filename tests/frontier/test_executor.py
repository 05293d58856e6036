"""The frontier executor with the real SDK against the simulator: answers, retries, budget, errors, cost."""

from __future__ import annotations

from typing import Any

import anthropic
import jsonschema
import pytest
import redis

from smallfirst.common.catalog import Task, default_catalog_path
from smallfirst.common.pricing import default_price_table
from smallfirst.frontier_worker.client import build_executor
from smallfirst.frontier_worker.errors import (
    FrontierAuthError,
    FrontierBadRequest,
    FrontierConfigurationError,
    FrontierUnavailable,
)
from smallfirst.frontier_worker.executor import EscalationContext, FrontierExecutor, RetryPolicy
from smallfirst.frontier_worker.prompts import AnswerShape
from smallfirst.frontier_worker.ratelimit import RateLimit, RedisRateLimiter
from smallfirst.frontier_worker.settings import FrontierWorkerSettings
from tests.frontier_fixtures import HAIKU, SIM_MODEL_WITHOUT_NATIVE_OUTPUT, SimControl, classify_task

SONNET = "claude-sonnet-5-5"
RETRY = RetryPolicy(max_attempts=4, max_wait_s=10.0, backoff_base_ms=100, backoff_max_ms=400)
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string"},
        "vendor": {"type": "string"},
        "total_amount": {"type": "string"},
    },
    "required": ["invoice_number", "vendor", "total_amount"],
    "additionalProperties": False,
}
INVOICE = "Vendor: ACME Tools GmbH\nInvoice number: INV-20417\nTotal amount: 1,234.50\n"


def extract_task(mode: str = "auto") -> Task:
    return Task.model_validate({
        "name": "invoice_fields", "kind": "extract", "schema": INVOICE_SCHEMA,
        "prompt": {"system": "Extract the invoice fields.", "user": "Invoice:\n{text}"},
        "small": {"model": "tiny-generator"},
        "frontier": {"model": HAIKU, "max_tokens": 256, "structured_output": mode},
    })


def generate_task(model: str = SONNET) -> Task:
    return Task.model_validate({
        "name": "email_summary", "kind": "generate",
        "prompt": {"system": "Summarize the email.", "user": "Email:\n{text}"},
        "small": {"model": "tiny-generator"},
        "frontier": {"model": model, "max_tokens": 512},
    })


def executor(url: str, retry: RetryPolicy = RETRY, limiter: RedisRateLimiter | None = None) -> FrontierExecutor:
    client = anthropic.Anthropic(api_key="sk-test", base_url=url, max_retries=0)
    return FrontierExecutor(client, limiter, default_price_table(), retry)


def outputs(sim: SimControl) -> list[tuple[Any, Any]]:
    return [(entry["status"], entry["output"]) for entry in sim.requests()]


# ---- Answers ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mode", "shape"), [("native", AnswerShape.NATIVE), ("tool", AnswerShape.TOOL)])
def test_classify_answers_a_label_through_structured_output(frontier_sim: SimControl, mode: str,
                                                            shape: AnswerShape) -> None:
    # given
    run = executor(frontier_sim.url)

    # when
    answer = run.run(classify_task(mode), {"text": "Where is my new card?"})

    # then
    assert answer.answer in ({"label": "refund"}, {"label": "card_arrival"})
    assert answer.shape is shape
    assert answer.parse_error is None
    assert outputs(frontier_sim) == [(200, shape.value)]
    assert answer.simulated
    assert answer.request_id
    assert answer.model == HAIKU


@pytest.mark.parametrize(("mode", "shape"), [("native", AnswerShape.NATIVE), ("tool", AnswerShape.TOOL)])
def test_extract_answers_the_parsed_object(frontier_sim: SimControl, mode: str, shape: AnswerShape) -> None:
    # given
    run = executor(frontier_sim.url)

    # when
    answer = run.run(extract_task(mode), {"text": INVOICE})

    # then
    jsonschema.validate(answer.answer, INVOICE_SCHEMA)
    assert answer.answer["invoice_number"] == "INV-20417"
    assert answer.answer["total_amount"] == "1,234.50"
    assert outputs(frontier_sim) == [(200, shape.value)]


def test_auto_mode_falls_back_to_a_forced_tool_for_a_model_without_native_output(frontier_sim: SimControl) -> None:
    # given
    run = executor(frontier_sim.url)
    task = classify_task("auto", model=SIM_MODEL_WITHOUT_NATIVE_OUTPUT)

    # when
    first = run.run(task, {"text": "I want my money back"})
    second = run.run(task, {"text": "I want my money back"})

    # then: the refusal is learned, the second job goes straight to the tool
    assert first.shape is AnswerShape.TOOL
    assert second.shape is AnswerShape.TOOL
    assert first.answer in ({"label": "refund"}, {"label": "card_arrival"})
    assert outputs(frontier_sim) == [(400, "native"), (200, "tool"), (200, "tool")]


def test_generate_returns_text(frontier_sim: SimControl) -> None:
    # when
    answer = executor(frontier_sim.url).run(generate_task(), {"text": "Lunch moved to 1pm."})

    # then
    assert answer.shape is AnswerShape.TEXT
    assert isinstance(answer.answer, str)
    assert "Lunch moved to 1pm." in answer.answer
    assert outputs(frontier_sim) == [(200, "text")]


def test_escalated_job_prompt_carries_the_small_answer_and_the_reasons(frontier_sim: SimControl) -> None:
    # given: the echo strategy answers a text request with the prompt it received
    escalation = EscalationContext(small_answer="lunch lunch lunch",
                                   reasons=["max_length: 900 characters, at most 400 allowed"])

    # when
    answer = executor(frontier_sim.url).run(generate_task(), {"text": "Lunch moved to 1pm."}, escalation)

    # then
    assert "Lunch moved to 1pm." in answer.answer
    assert "Its answer: lunch lunch lunch" in answer.answer
    assert "- max_length: 900 characters, at most 400 allowed" in answer.answer


def test_unparseable_structured_answer_is_returned_raw_with_the_reason(start_frontier_sim) -> None:
    # given
    sim = start_frontier_sim(STRATEGY="fixed", FIXED_ANSWER="sorry, I cannot")

    # when
    answer = executor(sim.url).run(extract_task("native"), {"text": INVOICE})

    # then
    assert answer.answer == "sorry, I cannot"
    assert answer.parse_error is not None
    assert "not JSON" in answer.parse_error


# ---- Retries ------------------------------------------------------------------------------------
def test_rate_limit_429_is_retried_after_the_providers_retry_after(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "429", "retry_after_s": 0.4, "count": 2})

    # when
    answer = executor(frontier_sim.url).run(classify_task(), {"text": "refund please"})

    # then
    assert [r.status_code for r in answer.retries] == [429, 429]
    assert all(r.retry_after_s == pytest.approx(0.4) and r.wait_s >= 0.4 for r in answer.retries)
    assert answer.provider_retries == 2
    assert [status for status, _ in outputs(frontier_sim)] == [429, 429, 200]


def test_overloaded_529_honours_its_retry_after(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "529", "retry_after_s": 0.3})

    # when
    answer = executor(frontier_sim.url).run(classify_task(), {"text": "refund please"})

    # then
    assert [(r.status_code, r.error_type) for r in answer.retries] == [(529, "overloaded_error")]
    assert answer.retries[0].wait_s >= 0.3


def test_529_500_and_dropped_connections_back_off_exponentially(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "529"}, {"kind": "500"}, {"kind": "drop"})

    # when
    answer = executor(frontier_sim.url).run(classify_task(), {"text": "refund please"})

    # then: retry n waits between half and all of base * 2^(n-1), capped
    assert [r.status_code for r in answer.retries] == [529, 500, None]
    for number, record in enumerate(answer.retries, start=1):
        step_s = min(RETRY.backoff_max_ms, RETRY.backoff_base_ms * 2 ** (number - 1)) / 1000
        assert step_s / 2 <= record.wait_s <= step_s
    assert answer.answer in ({"label": "refund"}, {"label": "card_arrival"})
    assert len(frontier_sim.requests()) == 4


def test_spent_attempt_budget_fails_with_frontier_unavailable(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "500", "count": 10})
    run = executor(frontier_sim.url, RetryPolicy(max_attempts=3, max_wait_s=10.0, backoff_base_ms=50))

    # when
    with pytest.raises(FrontierUnavailable) as raised:
        run.run(classify_task(), {"text": "refund please"})

    # then
    assert raised.value.code == "frontier_unavailable"
    assert raised.value.info().code == "frontier_unavailable"
    assert len(raised.value.retries) == 2
    assert "500 api_error" in raised.value.message
    assert len(frontier_sim.requests()) == 3


def test_retry_after_beyond_the_wait_budget_fails_without_waiting(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "429", "retry_after_s": 30})
    run = executor(frontier_sim.url, RetryPolicy(max_attempts=5, max_wait_s=5.0))

    # when
    with pytest.raises(FrontierUnavailable) as raised:
        run.run(classify_task(), {"text": "refund please"})

    # then
    assert raised.value.retries == ()
    assert raised.value.retry_after_s is not None
    assert raised.value.retry_after_s >= 30
    assert len(frontier_sim.requests()) == 1


def test_bad_request_fails_at_once_with_the_providers_message(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "400"})

    # when
    with pytest.raises(FrontierBadRequest) as raised:
        executor(frontier_sim.url).run(classify_task(), {"text": "refund please"})

    # then
    assert raised.value.code == "frontier_rejected"
    assert raised.value.status_code == 400
    assert "invalid request (simulated)" in raised.value.message
    assert len(frontier_sim.requests()) == 1


def test_native_output_refused_in_native_mode_is_a_bad_request_not_a_fallback(frontier_sim: SimControl) -> None:
    # when
    with pytest.raises(FrontierBadRequest, match="structured outputs are not supported"):
        executor(frontier_sim.url).run(classify_task("native", SIM_MODEL_WITHOUT_NATIVE_OUTPUT), {"text": "x"})

    # then
    assert outputs(frontier_sim) == [(400, "native")]


def test_rejected_key_fails_at_once_with_its_own_error(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "401"})

    # when
    with pytest.raises(FrontierAuthError) as raised:
        executor(frontier_sim.url).run(classify_task(), {"text": "refund please"})

    # then
    assert raised.value.code == "frontier_auth_failed"
    assert len(frontier_sim.requests()) == 1


# ---- Cost ---------------------------------------------------------------------------------------
def test_cost_is_computed_from_the_reported_usage(frontier_sim: SimControl) -> None:
    # given
    prices = default_price_table()

    # when
    answer = executor(frontier_sim.url).run(extract_task(), {"text": INVOICE})

    # then
    stats = frontier_sim.stats(log=False)
    assert answer.usage.input_tokens == stats["input_tokens_by_model"][HAIKU]
    assert answer.usage.output_tokens == stats["output_tokens_by_model"][HAIKU]
    price = prices[HAIKU]
    expected = (answer.usage.input_tokens * price.input + answer.usage.output_tokens * price.output) / 1e6
    assert answer.cost_usd == pytest.approx(expected)
    assert answer.cost_usd > 0


def test_unpriced_model_fails_before_any_call(frontier_sim: SimControl) -> None:
    # when
    with pytest.raises(FrontierConfigurationError, match="claude-fable-5"):
        executor(frontier_sim.url).run(generate_task(model="claude-fable-5"), {"text": "hi"})

    # then
    assert frontier_sim.requests() == []


# ---- Rate limit and wiring ----------------------------------------------------------------------
def test_limiter_wait_is_measured_and_spaces_the_calls(frontier_sim: SimControl, redis_url: str) -> None:
    # given: one request per 0.6 s window
    limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), {HAIKU: RateLimit(requests_per_min=1, window_s=0.6)})
    run = executor(frontier_sim.url, limiter=limiter)

    # when
    first = run.run(classify_task(), {"text": "one"})
    second = run.run(classify_task(), {"text": "two"})

    # then
    assert second.limiter_wait_s > 0
    arrivals = [entry["t"] for entry in frontier_sim.requests()]
    # Redis's clock admits; the simulator's stamps arrival a few ms later: allow that skew.
    assert arrivals[1] - arrivals[0] >= 0.6 - 0.1
    assert first.limiter_wait_s <= second.limiter_wait_s


def test_settings_without_a_key_build_an_executor_on_the_simulator(frontier_sim: SimControl, redis_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # given
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("SMALLFIRST_ANTHROPIC_API_KEY", raising=False)
    settings = FrontierWorkerSettings(redis_url=redis_url, catalog_path=default_catalog_path(),
                                      frontier_sim_url=frontier_sim.url,
                                      frontier_rate_limits={HAIKU: {"requests_per_min": 100}})

    # when
    answer = build_executor(settings, redis.Redis.from_url(redis_url)).run(classify_task(), {"text": "hi"})

    # then
    assert settings.endpoint().simulated
    assert answer.simulated
    assert redis.Redis.from_url(redis_url).exists(f"sf:ratelimit:{HAIKU}:requests")

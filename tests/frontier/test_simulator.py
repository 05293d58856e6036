"""The Messages-API simulator, spoken to by the official SDK (no executor in between)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest

from smallfirst.common.constants import HEADER_FRONTIER_SIMULATOR, HEADER_SIM_FAULT
from tests.frontier_fixtures import SimControl

MODEL = "claude-haiku-5-5"
INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]+$"},
        "vendor": {"type": "string"},
        "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD"]},
    },
    "required": ["invoice_number", "vendor", "total", "currency"],
    "additionalProperties": False,
}
INVOICE = "Vendor: ACME Tools GmbH\nInvoice number: INV-20417\nTotal: 1,234.50 EUR\n"


def client(url: str, api_key: str = "sk-test") -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=api_key, base_url=url, max_retries=0)


def test_text_request_is_echoed_with_usage_and_ids(frontier_sim: SimControl) -> None:
    # given
    sdk = client(frontier_sim.url)

    # when
    raw = sdk.messages.with_raw_response.create(model=MODEL, max_tokens=64, system="Be brief.",
                                                messages=[{"role": "user", "content": "hello there"}])
    message = raw.parse()

    # then
    assert message.content[0].type == "text"
    assert message.content[0].text == "hello there"
    assert message.stop_reason == "end_turn"
    assert message.id.startswith("msg_")
    assert raw.request_id
    assert raw.request_id.startswith("req_")
    assert raw.headers[HEADER_FRONTIER_SIMULATOR] == "true"
    assert message.usage.input_tokens >= 4
    assert message.usage.output_tokens >= 1


def test_native_structured_output_is_json_conforming_to_the_schema_and_grounded(frontier_sim: SimControl) -> None:
    # given
    sdk = client(frontier_sim.url)

    # when
    message = sdk.messages.create(model=MODEL, max_tokens=256, messages=[{"role": "user", "content": INVOICE}],
                                  output_config={"format": {"type": "json_schema", "schema": INVOICE_SCHEMA}})

    # then
    assert message.content[0].type == "text"
    answer = json.loads(message.content[0].text)
    jsonschema.validate(answer, INVOICE_SCHEMA)
    assert answer["invoice_number"] == "INV-20417"
    assert answer["vendor"] == "ACME Tools GmbH"
    assert answer["total"] == pytest.approx(1234.5)


def test_forced_tool_is_answered_with_a_tool_use_block(frontier_sim: SimControl) -> None:
    # given
    sdk = client(frontier_sim.url)

    # when
    message = sdk.messages.create(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": INVOICE}],
        tools=[{"name": "record_invoice", "input_schema": INVOICE_SCHEMA}],
        tool_choice={"type": "tool", "name": "record_invoice"},
    )

    # then
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use"
    assert block.name == "record_invoice"
    jsonschema.validate(block.input, INVOICE_SCHEMA)


def test_an_answer_longer_than_max_tokens_is_cut(frontier_sim: SimControl) -> None:
    # given
    sdk = client(frontier_sim.url)

    # when
    message = sdk.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "x" * 400}])

    # then
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == 2
    assert message.content[0].type == "text"
    assert len(message.content[0].text) < 400


@pytest.mark.parametrize(("body_change", "message_part"), [
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"tools": [{"name": "a", "input_schema": {"type": "object"}}], "tool_choice": {"type": "tool", "name": "b"}},
     "tool_choice.name"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "wrong"}}}}, "output_config"),
])
def test_malformed_requests_get_a_400_error_body_naming_the_field(frontier_sim: SimControl, body_change: dict,
                                                                   message_part: str) -> None:
    # given
    body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}], **body_change}

    # when
    response = httpx.post(f"{frontier_sim.url}/v1/messages", json=body, headers={"x-api-key": "k"})

    # then
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert message_part in error["error"]["message"]


def test_unknown_model_is_a_404_not_found_error(frontier_sim: SimControl) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        client(frontier_sim.url).messages.create(model="claude-imaginary-9", max_tokens=8,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert raised.value.type == "not_found_error"


def test_missing_key_is_refused_and_a_configured_key_is_enforced(frontier_sim: SimControl, start_frontier_sim) -> None:
    # given
    keyed = start_frontier_sim(API_KEY="sk-right")
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    # when
    no_key = httpx.post(f"{frontier_sim.url}/v1/messages", json=body)

    # then
    assert no_key.status_code == 401
    assert no_key.json()["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        client(keyed.url, api_key="sk-wrong").messages.create(**body)
    assert client(keyed.url, api_key="sk-right").messages.create(**body).content[0].text == "hi"


@pytest.mark.parametrize(("fault", "error", "status"), [
    ("429;retry_after_s=2", anthropic.RateLimitError, 429),
    ("529", anthropic.OverloadedError, 529),
    ("500", anthropic.InternalServerError, 500),
    ("400", anthropic.BadRequestError, 400),
])
def test_header_fault_answers_with_the_api_error_and_status(frontier_sim: SimControl, fault: str,
                                                            error: type[anthropic.APIStatusError], status: int) -> None:
    # given
    sdk = client(frontier_sim.url)

    # when
    with pytest.raises(error) as raised:
        sdk.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                            extra_headers={HEADER_SIM_FAULT: fault})

    # then
    assert raised.value.status_code == status
    if status == 429:
        assert raised.value.response.headers["retry-after"] == "2"
    assert frontier_sim.stats(log=False)["faults_served"] == {str(status): 1}


def test_dropped_connection_is_a_connection_error_for_the_client(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "drop"})

    # when / then
    with pytest.raises(anthropic.APIConnectionError):
        client(frontier_sim.url).messages.create(model=MODEL, max_tokens=8,
                                                 messages=[{"role": "user", "content": "hi"}])
    assert frontier_sim.stats(log=False)["responses_by_status"] == {"dropped": 1}


def test_queued_faults_are_served_in_order_then_answers_resume(frontier_sim: SimControl) -> None:
    # given
    frontier_sim.queue_faults({"kind": "529", "count": 2}, {"kind": "slow", "delay_ms": 10})
    sdk = client(frontier_sim.url)
    outcomes = []

    # when
    for _ in range(4):
        try:
            sdk.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
            outcomes.append("ok")
        except anthropic.OverloadedError:
            outcomes.append("529")

    # then
    assert outcomes == ["529", "529", "ok", "ok"]
    stats = frontier_sim.stats()
    assert stats["requests_by_model"] == {MODEL: 4}
    assert [entry["fault"] for entry in stats["requests"]] == ["529", "529", "slow", None]


def test_oracle_answers_the_label_of_the_input_text(start_frontier_sim, tmp_path: Path) -> None:
    # given
    labels = tmp_path / "labels.csv"
    labels.write_text('text,label\n"My card has not arrived yet",card_arrival\n"I want a refund",refund\n')
    sim = start_frontier_sim(STRATEGY="oracle", LABELS_PATH=str(labels))
    schema = {"type": "object", "properties": {"label": {"type": "string", "enum": ["refund", "card_arrival"]}},
              "required": ["label"], "additionalProperties": False}

    # when
    message = client(sim.url).messages.create(
        model=MODEL, max_tokens=32, system="Classify the ticket.",
        messages=[{"role": "user", "content": "Ticket:\nmy card has not arrived yet"}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )

    # then
    assert message.content[0].type == "text"
    assert json.loads(message.content[0].text) == {"label": "card_arrival"}
    assert sim.stats(log=False)["answers_by_source"] == {"oracle": 1}


def test_scripted_rules_match_the_prompt_and_the_sequence_serves_the_rest(start_frontier_sim,
                                                                          tmp_path: Path) -> None:
    # given
    script = tmp_path / "script.yaml"
    script.write_text('rules:\n  - match: "(?i)refund"\n    answer: {"label": "refund"}\n'
                      'sequence:\n  - "first"\n  - "second"\n')
    sim = start_frontier_sim(STRATEGY="scripted", SCRIPT_PATH=str(script))
    sdk = client(sim.url)

    def ask(text: str) -> str:
        message = sdk.messages.create(model=MODEL, max_tokens=32, messages=[{"role": "user", "content": text}])
        assert message.content[0].type == "text"
        return message.content[0].text

    # when
    answers = [ask("hello"), ask("I want a REFUND"), ask("again"), ask("and again")]

    # then
    assert answers == ["first", '{"label": "refund"}', "second", "and again"]


def test_models_are_listed(frontier_sim: SimControl) -> None:
    # when
    models = [model.id for model in client(frontier_sim.url).models.list()]

    # then
    assert "claude-haiku-5-5" in models
    assert "claude-sonnet-5-5" in models


def test_configured_fault_rates_inject_faults_without_any_request_asking(start_frontier_sim) -> None:
    # given
    sim = start_frontier_sim(FAULT_RATES='{"529": 1.0}', FAULT_SEED="7")

    # when / then
    for _ in range(3):
        with pytest.raises(anthropic.OverloadedError):
            client(sim.url).messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert sim.stats(log=False)["faults_served"] == {"529": 3}

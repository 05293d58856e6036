"""The simulator's Message Batches API, spoken to by the official SDK's batch client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import anthropic
import httpx
import pytest
from anthropic.types.messages import MessageBatch
from anthropic.types.messages.batch_create_params import Request

from smallfirst.frontier_sim.faults import BatchOutcome, BatchOutcomeInjector
from tests.frontier_fixtures import HAIKU, SimControl
from tests.support.procs import wait_until


def client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key="sk-test", base_url=url, max_retries=0)


def request(custom_id: str, text: str = "hello", **params: Any) -> Request:
    return cast(Request, {"custom_id": custom_id,
            "params": {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": text}], **params}})


def wait_ended(sdk: anthropic.Anthropic, batch_id: str, timeout_s: float = 30) -> MessageBatch:
    wait_until(lambda: sdk.messages.batches.retrieve(batch_id).processing_status == "ended", timeout_s,
               f"batch {batch_id} to end")
    return sdk.messages.batches.retrieve(batch_id)


@pytest.fixture
def quick_sim(start_frontier_sim: Callable[..., SimControl]) -> SimControl:
    """A simulator whose batches end 0.3 s after creation."""
    return start_frontier_sim(BATCH_PROCESSING_S="0.3", BATCH_CANCEL_S="0.2")


def test_a_batch_is_in_progress_then_ends_with_one_answer_per_custom_id(quick_sim: SimControl) -> None:
    # given
    sdk = client(quick_sim.url)

    # when
    created = sdk.messages.batches.create(requests=[request("job_a-1", "first"), request("job_b-1", "second"),
                                                    request("job_c-2", "third")])
    ended = wait_ended(sdk, created.id)
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(created.id)}

    # then
    assert created.processing_status == "in_progress"
    assert created.request_counts.processing == 3
    assert created.results_url is None
    assert created.ended_at is None
    assert (created.expires_at - created.created_at).total_seconds() == pytest.approx(86_400)
    assert ended.request_counts.succeeded == 3
    assert ended.request_counts.processing == 0
    assert ended.ended_at is not None
    assert ended.results_url is not None
    assert ended.results_url.endswith(f"/v1/messages/batches/{created.id}/results")
    assert set(results) == {"job_a-1", "job_b-1", "job_c-2"}
    texts = {}
    for custom_id, result in results.items():
        assert result.type == "succeeded"
        block = result.message.content[0]
        assert block.type == "text"
        texts[custom_id] = block.text
        assert result.message.usage.input_tokens >= 1
    assert texts == {"job_a-1": "first", "job_b-1": "second", "job_c-2": "third"}
    assert quick_sim.stats()["batches"]["requests_total"] == 3
    assert quick_sim.stats()["requests_total"] == 0  # no realtime call was made


def test_batch_requests_get_the_structured_answers_of_the_messages_endpoint(quick_sim: SimControl) -> None:
    # given
    schema = {"type": "object", "properties": {"invoice_number": {"type": "string", "pattern": "^INV-[0-9]+$"}},
              "required": ["invoice_number"]}
    sdk = client(quick_sim.url)

    # when
    batch = sdk.messages.batches.create(requests=[request(
        "extract-1", "Invoice number: INV-4711", output_config={"format": {"type": "json_schema", "schema": schema}})])
    wait_ended(sdk, batch.id)
    [result] = list(sdk.messages.batches.results(batch.id))

    # then
    assert result.result.type == "succeeded"
    block = result.result.message.content[0]
    assert block.type == "text"
    assert block.text == '{"invoice_number": "INV-4711"}'


@pytest.mark.parametrize(("requests", "message_part"), [
    ([], "requests"),
    ([request("same"), request("same")], "unique"),
    ([request("job:1")], "custom_id"),
    ([request("x" * 65)], "custom_id"),
    ([{"custom_id": "no-params"}], "params"),
])
def test_a_malformed_batch_is_refused_with_a_400_naming_the_field(quick_sim: SimControl, requests: list,
                                                                    message_part: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        client(quick_sim.url).messages.batches.create(requests=requests)
    assert raised.value.type == "invalid_request_error"
    assert message_part in str(raised.value)
    assert quick_sim.stats()["batches"]["created"] == 0


def test_bad_params_inside_a_batch_become_errored_results(quick_sim: SimControl) -> None:
    # given
    sdk = client(quick_sim.url)

    # when
    batch = sdk.messages.batches.create(requests=[
        request("fine"), request("no-tokens", max_tokens=0), request("no-model", model="claude-imaginary-9")])
    ended = wait_ended(sdk, batch.id)
    results = {r.custom_id: r.result for r in sdk.messages.batches.results(batch.id)}

    # then
    assert ended.request_counts.succeeded == 1
    assert ended.request_counts.errored == 2
    assert results["fine"].type == "succeeded"
    bad_tokens, bad_model = results["no-tokens"], results["no-model"]
    assert bad_tokens.type == "errored"
    assert bad_model.type == "errored"
    assert bad_tokens.error.error.type == "invalid_request_error"
    assert "max_tokens" in bad_tokens.error.error.message
    assert bad_model.error.error.type == "not_found_error"


def test_listing_pages_newest_first_with_the_sdk_cursors(quick_sim: SimControl) -> None:
    # given
    sdk = client(quick_sim.url)
    ids = [sdk.messages.batches.create(requests=[request(f"r{i}")]).id for i in range(5)]
    newest_first = list(reversed(ids))

    # when
    first_page = sdk.messages.batches.list(limit=2)
    every = [b.id for b in sdk.messages.batches.list(limit=2)]  # the SDK follows after_id page by page
    after = sdk.messages.batches.list(limit=2, after_id=newest_first[1])
    before = sdk.messages.batches.list(limit=2, before_id=newest_first[4])
    last_page = sdk.messages.batches.list(limit=2, after_id=newest_first[3])

    # then
    assert [b.id for b in first_page.data] == newest_first[:2]
    assert first_page.has_more is True
    assert first_page.first_id == newest_first[0]
    assert first_page.last_id == newest_first[1]
    assert every == newest_first
    assert [b.id for b in after.data] == newest_first[2:4]
    assert [b.id for b in before.data] == newest_first[2:4]
    assert before.has_more is True
    assert [b.id for b in last_page.data] == newest_first[4:]
    assert last_page.has_more is False


def test_a_cancelled_batch_goes_through_canceling_and_ends_with_canceled_results(
        start_frontier_sim: Callable[..., SimControl]) -> None:
    # given
    sim = start_frontier_sim(BATCH_PROCESSING_S="600", BATCH_CANCEL_S="0.3")
    sdk = client(sim.url)
    batch = sdk.messages.batches.create(requests=[request("c1"), request("c2")])

    # when
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.batches.delete(batch.id)  # still in progress
    canceling = sdk.messages.batches.cancel(batch.id)
    ended = wait_ended(sdk, batch.id)
    results = [r.result.type for r in sdk.messages.batches.results(batch.id)]
    deleted = sdk.messages.batches.delete(batch.id)

    # then
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert ended.request_counts.canceled == 2
    assert results == ["canceled", "canceled"]
    assert deleted.id == batch.id
    assert deleted.type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.batches.retrieve(batch.id)


def test_results_of_a_batch_still_processing_are_refused(start_frontier_sim: Callable[..., SimControl]) -> None:
    # given
    sim = start_frontier_sim(BATCH_PROCESSING_S="600")
    batch = client(sim.url).messages.batches.create(requests=[request("p1")])

    # when
    response = httpx.get(f"{sim.url}/v1/messages/batches/{batch.id}/results", headers={"x-api-key": "k"})

    # then
    assert response.status_code == 400
    assert "not ended" in response.json()["error"]["message"]
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client(sim.url).messages.batches.results(batch.id)


def test_a_batch_processing_past_its_expiry_ends_with_expired_results(
        start_frontier_sim: Callable[..., SimControl]) -> None:
    # given
    sim = start_frontier_sim(BATCH_PROCESSING_S="600", BATCH_EXPIRY_S="0.3")
    sdk = client(sim.url)

    # when
    batch = sdk.messages.batches.create(requests=[request("e1"), request("e2")])
    ended = wait_ended(sdk, batch.id)

    # then
    assert ended.request_counts.expired == 2
    assert {r.result.type for r in sdk.messages.batches.results(batch.id)} == {"expired"}


def test_injected_errored_and_expired_shares_are_the_same_for_a_custom_id_in_every_run(
        start_frontier_sim: Callable[..., SimControl]) -> None:
    # given
    sim = start_frontier_sim(BATCH_PROCESSING_S="0.3", BATCH_ERRORED_RATE="0.3", BATCH_EXPIRED_RATE="0.2",
                             BATCH_OUTCOME_SEED="7")
    sdk = client(sim.url)
    custom_ids = [f"job_{i:04d}-1" for i in range(60)]
    expected = BatchOutcomeInjector(0.3, 0.2, 7)

    # when
    first = sdk.messages.batches.create(requests=[request(c) for c in custom_ids])
    again = sdk.messages.batches.create(requests=[request(c) for c in custom_ids])
    wait_ended(sdk, again.id)
    wait_ended(sdk, first.id)
    first_types = {r.custom_id: r.result.type for r in sdk.messages.batches.results(first.id)}
    again_types = {r.custom_id: r.result.type for r in sdk.messages.batches.results(again.id)}
    first_errors = [r.result.error.error.type for r in sdk.messages.batches.results(first.id)
                    if r.result.type == "errored"]

    # then
    assert first_types == again_types
    predicted = {c: {BatchOutcome.ERRORED: "errored", BatchOutcome.EXPIRED: "expired"}.get(
        expected.outcome(c), "succeeded") for c in custom_ids}
    assert first_types == predicted
    assert {"errored", "expired", "succeeded"} <= set(first_types.values())
    assert set(first_errors) == {"api_error"}
    assert sim.stats()["batches"]["custom_ids_sent_more_than_once"] == sorted(custom_ids)


def test_forced_outcomes_apply_to_the_named_custom_ids_only(quick_sim: SimControl) -> None:
    # given
    quick_sim.force_batch_outcomes({"bad-1": "errored", "late-1": "expired"})
    sdk = client(quick_sim.url)

    # when
    batch = sdk.messages.batches.create(requests=[request("bad-1"), request("late-1"), request("good-1")])
    ended = wait_ended(sdk, batch.id)
    types = {r.custom_id: r.result.type for r in sdk.messages.batches.results(batch.id)}

    # then
    assert types == {"bad-1": "errored", "late-1": "expired", "good-1": "succeeded"}
    assert (ended.request_counts.errored, ended.request_counts.expired, ended.request_counts.succeeded) == (1, 1, 1)

from __future__ import annotations

import pytest

from smallfirst.common.jobs import Tier
from smallfirst.common.validation import LearnedGate, validate


def test_classify_answer_outside_labels_fails(catalog) -> None:
    task = catalog.get("banking77_intent")
    verdict = validate(task, {"label": "pizza_order"}, 0.9, {"text": "x"})
    assert not verdict.passed
    assert verdict.reasons[0].startswith("choice:")


def test_classify_answer_with_low_confidence_fails_with_reason(catalog) -> None:
    task = catalog.get("banking77_intent")
    verdict = validate(task, {"label": "card_arrival"}, 0.2, {"text": "where is my card"})
    assert not verdict.passed
    assert verdict.reasons == ["min_confidence: confidence 0.200 is below 0.500"]


def test_confident_classify_answer_passes(catalog) -> None:
    verdict = validate(catalog.get("banking77_intent"), {"label": "card_arrival"}, 0.8, {"text": "card?"})
    assert verdict.passed
    assert verdict.reasons == []


INVOICE = "Invoice INV-2041 from Acme Tools Ltd. Total due: 1,250.00 EUR by 2026-12-01."


def test_grounded_extract_passes(catalog) -> None:
    answer = {"invoice_number": "INV-2041", "vendor": "Acme Tools Ltd", "total_amount": "1,250.00", "currency": "EUR"}
    assert validate(catalog.get("invoice_fields"), answer, None, {"text": INVOICE}).passed


def test_invented_value_fails_grounded(catalog) -> None:
    answer = {"invoice_number": "INV-9999", "vendor": "Acme Tools Ltd", "total_amount": "1,250.00", "currency": "EUR"}
    verdict = validate(catalog.get("invoice_fields"), answer, None, {"text": INVOICE})
    assert not verdict.passed
    assert any(r.startswith("grounded: invoice_number") for r in verdict.reasons)


def test_truncated_json_fails_schema(catalog) -> None:
    verdict = validate(catalog.get("invoice_fields"), '{"invoice_number": "INV-', None, {"text": INVOICE})
    assert not verdict.passed
    assert verdict.reasons[0].startswith("json_schema: the answer is not JSON")


def test_missing_required_field_fails_schema(catalog) -> None:
    verdict = validate(catalog.get("invoice_fields"), {"vendor": "Acme Tools Ltd"}, None, {"text": INVOICE})
    assert not verdict.passed
    assert any("'invoice_number' is a required property" in r for r in verdict.reasons)


def test_regex_on_field(catalog) -> None:
    answer = {"invoice_number": "INV-2041", "vendor": "Acme Tools Ltd", "total_amount": "due", "currency": "EUR"}
    verdict = validate(catalog.get("invoice_fields"), answer, None, {"text": INVOICE + " due"})
    assert any(r.startswith("regex: field 'total_amount'") for r in verdict.reasons)


def test_summary_too_long_or_empty_fails(catalog) -> None:
    task = catalog.get("email_summary")
    too_long = validate(task, "x" * 601, None, {"text": "hi"})
    assert too_long.reasons == ["max_length: 601 characters, at most 600 allowed"]
    assert "non_empty: the answer is empty" in validate(task, "   ", None, {"text": "hi"}).reasons
    assert validate(task, "Ann asks for a refund by Friday.", None, {"text": "hi"}).passed


def test_frontier_classify_answer_needs_no_confidence(catalog) -> None:
    # given: a frontier answer (no confidence score) to a task with a min_confidence validator
    verdict = validate(catalog.get("banking77_intent"), {"label": "card_arrival"}, None, {"text": "card?"},
                       tier=Tier.FRONTIER)
    # then: the threshold, which decides escalation, does not apply
    assert verdict.passed


def test_small_classify_answer_without_confidence_fails(catalog) -> None:
    verdict = validate(catalog.get("banking77_intent"), {"label": "card_arrival"}, None, {"text": "card?"})
    assert verdict.reasons == ["min_confidence: the answer carries no confidence"]


# (name, confidence, novelty, expected reason prefixes) for a head gating at 0.3 with a floor of 0.4
GATE_ROWS = [
    ("confident and familiar: passes, though below the seed scorer's min_confidence 0.5", 0.35, 0.1, []),
    ("below the calibrated threshold: escalates", 0.25, 0.1, ["learned_threshold:"]),
    ("confident but unlike any training example: escalates", 0.99, 0.6, ["novelty:"]),
    ("both", 0.1, 0.6, ["learned_threshold:", "novelty:"]),
]


@pytest.mark.parametrize(("name", "confidence", "novelty", "prefixes"), GATE_ROWS, ids=[r[0] for r in GATE_ROWS])
def test_a_trained_heads_gate_replaces_min_confidence(catalog, name: str, confidence: float, novelty: float,
                                                      prefixes: list[str]) -> None:
    # given: the Banking77 task (min_confidence 0.5) answered by a head gating at 0.3
    gate = LearnedGate(version=3, threshold=0.3, novelty=novelty, novelty_floor=0.4)
    # when
    verdict = validate(catalog.get("banking77_intent"), {"label": "card_arrival"}, confidence, {"text": "card?"},
                       gate=gate)
    # then
    assert [reason.split(" ")[0] for reason in verdict.reasons] == prefixes, name
    assert all("head v3" in reason for reason in verdict.reasons)

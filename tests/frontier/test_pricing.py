"""The price table: costs from usage, configurable files, loud failures for unknown models."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallfirst.common.jobs import Usage
from smallfirst.common.pricing import (
    ModelPrice,
    PriceTable,
    PricingError,
    UnknownModelPrice,
    cost_usd,
    default_price_table,
    load_price_table,
)


def test_cost_adds_every_token_kind_at_its_own_price() -> None:
    # given
    table = PriceTable({"m": ModelPrice(input=3.0, output=15.0, cache_write=3.75, cache_read=0.30)})
    usage = Usage(input_tokens=1_000, output_tokens=200, cache_creation_input_tokens=4_000,
                  cache_read_input_tokens=10_000)

    # when
    cost = table.cost_usd("m", usage)

    # then
    assert cost == pytest.approx((1_000 * 3.0 + 200 * 15.0 + 4_000 * 3.75 + 10_000 * 0.30) / 1_000_000)


def test_unknown_model_raises_a_typed_error_naming_the_model() -> None:
    # given
    table = default_price_table()

    # when / then
    with pytest.raises(UnknownModelPrice, match="claude-imaginary-9"):
        table.cost_usd("claude-imaginary-9", Usage(input_tokens=1))


def test_default_table_prices_the_catalog_models_of_the_lead(catalog) -> None:
    # given
    table = default_price_table()

    # when
    unpriced = {task.frontier.model for task in catalog.tasks()} - set(table)

    # then
    assert unpriced == set()
    assert cost_usd("claude-haiku-5-5", Usage(input_tokens=1_000_000)) == pytest.approx(table["claude-haiku-5-5"].input)


def test_a_configured_price_file_replaces_the_default(tmp_path: Path) -> None:
    # given
    file = tmp_path / "prices.yaml"
    file.write_text("models:\n  claude-haiku-5-5: {input: 2, output: 10, cache_write: 2.5, cache_read: 0.2}\n")

    # when
    table = load_price_table(file)

    # then
    assert list(table) == ["claude-haiku-5-5"]
    assert table.cost_usd("claude-haiku-5-5", Usage(output_tokens=500_000)) == pytest.approx(5.0)


@pytest.mark.parametrize(("content", "problem"), [
    ("models:\n  m: {input: 1, output: 2}\n", "models.m.cache_write"),
    ("models:\n  m: {input: -1, output: 2, cache_write: 1, cache_read: 1}\n", "models.m.input"),
    ("currency: EUR\nmodels:\n  m: {input: 1, output: 2, cache_write: 1, cache_read: 1}\n", "USD"),
    ("models: {}\n", "no models"),
    ("models: [\n", "not valid YAML"),
])
def test_a_bad_price_file_is_refused_with_the_file_and_entry_named(tmp_path: Path, content: str,
                                                                   problem: str) -> None:
    # given
    file = tmp_path / "prices.yaml"
    file.write_text(content)

    # when / then
    with pytest.raises(PricingError, match=problem) as raised:
        load_price_table(file)
    assert str(file) in str(raised.value)


def test_a_missing_price_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="does not exist"):
        load_price_table(tmp_path / "absent.yaml")


def test_a_batch_request_costs_the_file_wide_batch_factor_of_the_list_price(tmp_path: Path) -> None:
    # given
    file = tmp_path / "prices.yaml"
    file.write_text("batch_price_factor: 0.4\n"
                    "models:\n  m: {input: 3, output: 15, cache_write: 3.75, cache_read: 0.3}\n")
    usage = Usage(input_tokens=1_000, output_tokens=200, cache_creation_input_tokens=400, cache_read_input_tokens=900)
    table = load_price_table(file)

    # when
    realtime, batch = table.cost_usd("m", usage), table.cost_usd("m", usage, batch=True)

    # then
    assert realtime == pytest.approx((1_000 * 3 + 200 * 15 + 400 * 3.75 + 900 * 0.3) / 1_000_000)
    assert batch == pytest.approx(0.4 * realtime)


def test_a_model_entry_overrides_the_batch_factor_and_a_file_without_one_gets_half_price(tmp_path: Path) -> None:
    # given
    file = tmp_path / "prices.yaml"
    file.write_text("models:\n"
                    "  plain: {input: 1, output: 5, cache_write: 1.25, cache_read: 0.1}\n"
                    "  special: {input: 1, output: 5, cache_write: 1.25, cache_read: 0.1, batch_price_factor: 0.8}\n")
    usage = Usage(input_tokens=1_000_000)

    # when
    table = load_price_table(file)

    # then
    assert table.cost_usd("plain", usage, batch=True) == pytest.approx(0.5)
    assert table.cost_usd("special", usage, batch=True) == pytest.approx(0.8)
    assert cost_usd("claude-haiku-5-5", usage, batch=True) == pytest.approx(0.5 * cost_usd("claude-haiku-5-5", usage))


@pytest.mark.parametrize("factor", ["0", "1.5", "-0.5"])
def test_a_batch_factor_outside_zero_to_one_is_refused(tmp_path: Path, factor: str) -> None:
    # given
    file = tmp_path / "prices.yaml"
    file.write_text(f"batch_price_factor: {factor}\n"
                    "models:\n  m: {input: 1, output: 2, cache_write: 1, cache_read: 1}\n")

    # when / then
    with pytest.raises(PricingError, match="batch_price_factor"):
        load_price_table(file)

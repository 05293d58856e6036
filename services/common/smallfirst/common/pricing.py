"""Frontier model prices and the cost of a call.

Prices are configuration: a YAML file of USD per million tokens per model (input, output, cache
writes, cache reads). The package embeds a default file (`data/prices.yaml`); a deployment points
the services at its own copy. Both tiers use the table: the frontier worker to bill its calls, the
small worker to estimate what the frontier would have charged for the same tokens (the savings).

Requests sent through the Message Batches API are billed at `batch_price_factor` times the list
price of every token kind: a file-wide value (Anthropic's published batch price is half the list
price, 0.5), which a model's own entry may override.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smallfirst.common.errors import ConfigurationError
from smallfirst.common.jobs import Usage

TOKENS_PER_PRICE_UNIT = 1_000_000
# The factor of a price file that does not name one: the provider's published batch price.
DEFAULT_BATCH_PRICE_FACTOR = 0.5


class PricingError(ConfigurationError, ValueError):
    """The price file could not be loaded; the message names the file and the entry."""


class UnknownModelPrice(ConfigurationError, LookupError):
    """No price is configured for a model, so its calls cannot be costed."""

    def __init__(self, model: str, known: tuple[str, ...]) -> None:
        super().__init__(f"no price configured for model {model!r}; priced models: {', '.join(known)}")
        self.model = model


class ModelPrice(BaseModel):
    """USD per million tokens."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_write: float = Field(ge=0)
    cache_read: float = Field(ge=0)
    # Batch price / list price; None in a file entry: the file's batch_price_factor.
    batch_price_factor: float | None = Field(default=None, gt=0, le=1)

    def cost_usd(self, usage: Usage, batch: bool = False) -> float:
        """USD for `usage`; `batch`: at the Message Batches price."""
        factor = 1.0
        if batch:
            factor = DEFAULT_BATCH_PRICE_FACTOR if self.batch_price_factor is None else self.batch_price_factor
        micro_usd = factor * (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_creation_input_tokens * self.cache_write
            + usage.cache_read_input_tokens * self.cache_read
        )
        return micro_usd / TOKENS_PER_PRICE_UNIT


class _PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    currency: str = "USD"
    unit: str = "per_million_tokens"
    batch_price_factor: float = Field(default=DEFAULT_BATCH_PRICE_FACTOR, gt=0, le=1)
    models: dict[str, ModelPrice]


class PriceTable(Mapping[str, ModelPrice]):
    """Prices by model id, read-only."""

    def __init__(self, prices: Mapping[str, ModelPrice], source: Path | None = None) -> None:
        self._prices = dict(prices)
        self.source = source

    def __getitem__(self, model: str) -> ModelPrice:
        return self._prices[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._prices)

    def __len__(self) -> int:
        return len(self._prices)

    def price(self, model: str) -> ModelPrice:
        try:
            return self._prices[model]
        except KeyError:
            raise UnknownModelPrice(model, tuple(sorted(self._prices))) from None

    def cost_usd(self, model: str, usage: Usage, batch: bool = False) -> float:
        return self.price(model).cost_usd(usage, batch=batch)


def default_prices_path() -> Path:
    return Path(__file__).parent / "data" / "prices.yaml"


def load_price_table(path: Path | str | None = None) -> PriceTable:
    """Load a price file; without a path, the default one embedded in the package."""
    file = Path(path) if path is not None else default_prices_path()
    try:
        document: Any = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PricingError(f"{file}: price file does not exist") from None
    except yaml.YAMLError as exc:
        raise PricingError(f"{file}: not valid YAML: {exc}") from exc
    try:
        parsed = _PriceFile.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
        )
        raise PricingError(f"{file}: {problems}") from exc
    if parsed.currency != "USD" or parsed.unit != "per_million_tokens":
        raise PricingError(f"{file}: prices must be in USD per_million_tokens, got {parsed.currency} {parsed.unit}")
    if not parsed.models:
        raise PricingError(f"{file}: no models priced")
    prices = {model: price if price.batch_price_factor is not None
              else price.model_copy(update={"batch_price_factor": parsed.batch_price_factor})
              for model, price in parsed.models.items()}
    return PriceTable(prices, source=file)


@functools.cache
def default_price_table() -> PriceTable:
    """The embedded table, loaded once on first use (never at import)."""
    return load_price_table()


def cost_usd(model: str, usage: Usage, prices: PriceTable | None = None, batch: bool = False) -> float:
    """What `usage` on `model` costs in USD (`batch`: sent in a Message Batch); without `prices`, by
    the embedded default table.

    Raises UnknownModelPrice for a model the table does not list.
    """
    return (prices if prices is not None else default_price_table()).cost_usd(model, usage, batch=batch)

"""Fault injection: what the next answer does instead of (or before) answering.

Three sources, in this order: the request's own `x-sim-fault` header (one request), faults queued
through `POST /_sim/faults` (the next N requests, whichever process sends them), and random faults
at configured rates (soak tests, benchmarks).

Requests in a Message Batch have outcomes of their own (`BatchOutcomeInjector`): `errored` or
`expired`, set for a custom_id through `POST /_sim/batch-outcomes`, or drawn at configured rates
from a hash of the seed and the custom_id, so the same custom_id gets the same outcome in every run.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from smallfirst.common.errors import ConfigurationError

_ALIASES = {
    "bad_request": "400",
    "invalid_request_error": "400",
    "authentication_error": "401",
    "rate_limit": "429",
    "rate_limit_error": "429",
    "overloaded": "529",
    "overloaded_error": "529",
    "server_error": "500",
    "api_error": "500",
    "delay": "slow",
    "disconnect": "drop",
}


class FaultSpecError(ConfigurationError, ValueError):
    """A fault description the simulator does not understand."""


class FaultKind(StrEnum):
    BAD_REQUEST = "400"  # invalid_request_error: a client must not retry it
    AUTHENTICATION = "401"
    RATE_LIMIT = "429"
    OVERLOADED = "529"
    SERVER_ERROR = "500"
    SLOW = "slow"  # answers, after a delay
    DROP = "drop"  # closes the connection half-way through the response

    @classmethod
    def parse(cls, value: str) -> FaultKind:
        name = value.strip().lower()
        try:
            return cls(_ALIASES.get(name, name))
        except ValueError:
            known = sorted({k.value for k in cls} | set(_ALIASES))
            raise FaultSpecError(f"unknown fault {value!r}; known: {', '.join(known)}") from None


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    retry_after_s: float | None = None
    delay_ms: int = 0
    # Which source served it: header, queue or random (reported in the stats).
    source: str = "queue"


class FaultSpec(BaseModel):
    """One entry of `POST /_sim/faults`: `count` faults of one kind."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    count: int = Field(default=1, ge=1, le=100_000)
    retry_after_s: float | None = Field(default=None, ge=0)
    delay_ms: int | None = Field(default=None, ge=0)


class FaultRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    faults: list[FaultSpec]


def parse_fault_header(value: str) -> Fault:
    """`429`, `429;retry_after_s=0.5`, `slow;delay_ms=300`, `drop`."""
    kind_text, *params = [part.strip() for part in value.split(";") if part.strip()] or [""]
    kind = FaultKind.parse(kind_text)
    retry_after_s: float | None = None
    delay_ms = 0
    for param in params:
        key, sep, raw = param.partition("=")
        if not sep:
            raise FaultSpecError(f"fault parameter {param!r} is not key=value")
        try:
            if key == "retry_after_s":
                retry_after_s = float(raw)
            elif key == "delay_ms":
                delay_ms = int(raw)
            else:
                raise FaultSpecError(f"unknown fault parameter {key!r}; known: retry_after_s, delay_ms")
        except ValueError as exc:
            if isinstance(exc, FaultSpecError):
                raise
            raise FaultSpecError(f"fault parameter {param!r}: not a number") from exc
    return Fault(kind, retry_after_s, delay_ms, source="header")


class FaultInjector:
    def __init__(self, rates: Mapping[str, float], seed: int | None, default_retry_after_s: float,
                 default_slow_ms: int) -> None:
        self._rates = [(FaultKind.parse(kind), rate) for kind, rate in rates.items() if rate > 0]
        self._random = random.Random(seed)
        self._queue: deque[Fault] = deque()
        self.default_retry_after_s = default_retry_after_s
        self.default_slow_ms = default_slow_ms

    def enqueue(self, specs: Iterable[FaultSpec]) -> int:
        faults = []
        for spec in specs:
            kind = FaultKind.parse(spec.kind)
            fault = self._complete(Fault(kind, spec.retry_after_s, spec.delay_ms or 0, source="queue"))
            faults.extend([fault] * spec.count)
        self._queue.extend(faults)
        return len(self._queue)

    def pending(self) -> int:
        return len(self._queue)

    def clear(self) -> None:
        self._queue.clear()

    def next_fault(self, header_value: str | None) -> Fault | None:
        if header_value:
            return self._complete(parse_fault_header(header_value))
        if self._queue:
            return self._queue.popleft()
        draw = self._random.random()
        for kind, rate in self._rates:
            if draw < rate:
                return self._complete(Fault(kind, source="random"))
            draw -= rate
        return None

    def _complete(self, fault: Fault) -> Fault:
        """Fill in the configured defaults a fault left open."""
        retry_after_s = fault.retry_after_s
        if retry_after_s is None and fault.kind is FaultKind.RATE_LIMIT:
            retry_after_s = self.default_retry_after_s
        delay_ms = fault.delay_ms
        if fault.kind is FaultKind.SLOW and not delay_ms:
            delay_ms = self.default_slow_ms
        return Fault(fault.kind, retry_after_s, delay_ms, fault.source)


class BatchOutcome(StrEnum):
    ANSWERED = "answered"  # answered like a Messages request (which may still fail on its params)
    ERRORED = "errored"  # an api_error result, as a provider-side failure of that one request
    EXPIRED = "expired"  # not processed before the batch expired


class BatchOutcomesRequest(BaseModel):
    """`POST /_sim/batch-outcomes`: custom_id -> errored or expired, for batches created afterwards."""

    model_config = ConfigDict(extra="forbid")

    outcomes: dict[str, BatchOutcome]


# Draws are read from this many leading bytes of the hash: a float in [0, 1) with 2**-64 resolution.
_DRAW_BYTES = 8


class BatchOutcomeInjector:
    def __init__(self, errored_rate: float, expired_rate: float, seed: int | None) -> None:
        self._errored_rate = errored_rate
        self._expired_rate = expired_rate
        self._seed = 0 if seed is None else seed
        self._forced: dict[str, BatchOutcome] = {}

    def force(self, outcomes: Mapping[str, BatchOutcome]) -> int:
        self._forced.update(outcomes)
        return len(self._forced)

    def clear(self) -> None:
        self._forced.clear()

    def draw(self, custom_id: str) -> float:
        digest = hashlib.sha256(f"{self._seed}:{custom_id}".encode()).digest()
        return int.from_bytes(digest[:_DRAW_BYTES], "big") / 2 ** (8 * _DRAW_BYTES)

    def outcome(self, custom_id: str) -> BatchOutcome:
        forced = self._forced.get(custom_id)
        if forced is not None:
            return forced
        draw = self.draw(custom_id)
        if draw < self._errored_rate:
            return BatchOutcome.ERRORED
        if draw < self._errored_rate + self._expired_rate:
            return BatchOutcome.EXPIRED
        return BatchOutcome.ANSWERED

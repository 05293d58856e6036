"""The Message Batches API of the simulator: create, retrieve, list, cancel, delete, results (JSONL).

Batches live in the simulator process's memory only: a restarted simulator has none, as a test or a
development stack expects of a stand-in (the real API keeps them for 29 days).

Timing follows the real API's shape on a shorter clock: a batch is `in_progress` for
`batch_processing_s`, then `ended`; a cancelled one is `canceling` for `batch_cancel_s`, then
`ended` with its requests `canceled`; one whose processing would outlast `batch_expiry_s` ends at
that moment with its requests `expired`. Status is computed from the clock when the batch is read,
so nothing runs in the background. Each request is answered, when its batch ends, by the same code
that answers `POST /v1/messages`.

As the real API does, `create` checks the envelope (a non-empty `requests` list, each with a unique
`custom_id` of 1 to 64 letters, digits, `_` or `-`, and a `params` object) and refuses it with a
400; the `params` themselves are checked like a Messages request, and one that fails is reported
as an `errored` result with an `invalid_request_error` when the batch ends.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from smallfirst.frontier_sim.faults import BatchOutcome, BatchOutcomeInjector
from smallfirst.frontier_sim.protocol import ApiError, SimRequest, invalid, parse_request

CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS_PER_BATCH = 100_000
LIST_DEFAULT_LIMIT = 20
LIST_MAX_LIMIT = 1000


class ProcessingStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    CANCELING = "canceling"
    ENDED = "ended"


@dataclass
class _Entry:
    custom_id: str
    # The parsed params, or the error the Messages API would have answered them with.
    request: SimRequest | None
    error: ApiError | None


@dataclass
class SimBatch:
    id: str
    created_at: float
    entries: list[_Entry]
    processing_s: float
    expiry_s: float
    cancel_s: float
    cancel_initiated_at: float | None = None
    # Filled once, when the batch is first read after it ended: one result per request.
    results: list[dict[str, Any]] | None = None
    ended_at: float | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def expires_at(self) -> float:
        return self.created_at + self.expiry_s

    def end_time(self) -> tuple[float, str]:
        """When the batch ends and what its unfinished requests become then."""
        if self.cancel_initiated_at is not None:
            return self.cancel_initiated_at + self.cancel_s, "canceled"
        natural = self.created_at + self.processing_s
        if natural >= self.expires_at:
            return self.expires_at, "expired"
        return natural, "answered"

    def status(self, now: float) -> ProcessingStatus:
        if self.results is not None or now >= self.end_time()[0]:
            return ProcessingStatus.ENDED
        return ProcessingStatus.CANCELING if self.cancel_initiated_at is not None else ProcessingStatus.IN_PROGRESS


def _rfc3339(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


# The answer of one request: (params) -> Messages response body, or raises ApiError like /v1/messages.
Answerer = Callable[[SimRequest], dict[str, Any]]


class BatchStore:
    """Every batch of this simulator process, newest last; read and changed from the event loop only."""

    def __init__(self, answer: Answerer, outcomes: BatchOutcomeInjector, *, processing_s: float,
                 expiry_s: float, cancel_s: float, clock: Callable[[], float] = time.time) -> None:
        self._answer = answer
        self.outcomes = outcomes
        self._processing_s = processing_s
        self._expiry_s = expiry_s
        self._cancel_s = cancel_s
        self._clock = clock
        self._batches: dict[str, SimBatch] = {}
        self.reset_counts()

    def reset(self) -> None:
        self._batches.clear()
        self.outcomes.clear()
        self.reset_counts()

    def reset_counts(self) -> None:
        self.created = 0
        self.requests_total = 0
        # custom_id -> how many batches carried it: a client that sends a request twice shows here.
        self.custom_id_sends: dict[str, int] = {}
        self.results_by_type: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "live": len(self._batches),
            "requests_total": self.requests_total,
            "custom_ids_sent_more_than_once": sorted(c for c, n in self.custom_id_sends.items() if n > 1),
            "results_by_type": dict(self.results_by_type),
        }

    # ---- Requests -------------------------------------------------------------------------------
    def create(self, body: Any) -> SimBatch:
        if not isinstance(body, dict):
            raise invalid("request body must be a JSON object")
        raw_requests = body.get("requests")
        if not isinstance(raw_requests, list) or not raw_requests:
            raise invalid("requests: at least one request is required")
        if len(raw_requests) > MAX_REQUESTS_PER_BATCH:
            raise invalid(f"requests: at most {MAX_REQUESTS_PER_BATCH} requests per batch, got {len(raw_requests)}")
        entries: list[_Entry] = []
        seen: set[str] = set()
        for index, item in enumerate(raw_requests):
            where = f"requests.{index}"
            if not isinstance(item, dict):
                raise invalid(f"{where}: must be an object with 'custom_id' and 'params'")
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not CUSTOM_ID_PATTERN.match(custom_id):
                raise invalid(f"{where}.custom_id: must match {CUSTOM_ID_PATTERN.pattern}")
            if custom_id in seen:
                raise invalid(f"{where}.custom_id: {custom_id!r} is used by another request of this batch; "
                              "custom_id must be unique within a batch")
            seen.add(custom_id)
            params = item.get("params")
            if not isinstance(params, dict):
                raise invalid(f"{where}.params: must be an object of Messages API parameters")
            try:
                entries.append(_Entry(custom_id, parse_request(params), None))
            except ApiError as exc:
                entries.append(_Entry(custom_id, None, exc))
        batch = SimBatch(id=f"msgbatch_sim_{secrets.token_hex(12)}", created_at=self._clock(), entries=entries,
                         processing_s=self._processing_s, expiry_s=self._expiry_s, cancel_s=self._cancel_s)
        self._batches[batch.id] = batch
        self.created += 1
        self.requests_total += len(entries)
        for entry in entries:
            self.custom_id_sends[entry.custom_id] = self.custom_id_sends.get(entry.custom_id, 0) + 1
        return batch

    def get(self, batch_id: str) -> SimBatch:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise ApiError(404, "not_found_error", f"message_batch: {batch_id} not found")
        self._settle(batch)
        return batch

    def list_page(self, limit: int | None, after_id: str | None, before_id: str | None) -> dict[str, Any]:
        """Newest first; `after_id` pages towards older batches, `before_id` towards newer ones."""
        if limit is None:
            limit = LIST_DEFAULT_LIMIT
        if not 1 <= limit <= LIST_MAX_LIMIT:
            raise invalid(f"limit: must lie between 1 and {LIST_MAX_LIMIT}")
        if after_id and before_id:
            raise invalid("after_id, before_id: give one cursor, not both")
        ordered = list(reversed(self._batches.values()))
        ids = [b.id for b in ordered]
        if after_id:
            start = self._cursor(ids, after_id, "after_id") + 1
            page = ordered[start:start + limit]
            has_more = start + limit < len(ordered)
        elif before_id:
            end = self._cursor(ids, before_id, "before_id")
            start = max(0, end - limit)
            page = ordered[start:end]
            has_more = start > 0
        else:
            page = ordered[:limit]
            has_more = limit < len(ordered)
        for batch in page:
            self._settle(batch)
        return {"page": page, "has_more": has_more,
                "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None}

    @staticmethod
    def _cursor(ids: list[str], batch_id: str, name: str) -> int:
        try:
            return ids.index(batch_id)
        except ValueError:
            raise invalid(f"{name}: no message batch {batch_id!r}") from None

    def cancel(self, batch_id: str) -> SimBatch:
        batch = self.get(batch_id)
        if batch.status(self._clock()) is ProcessingStatus.IN_PROGRESS:
            batch.cancel_initiated_at = self._clock()
            self._settle(batch)
        return batch

    def delete(self, batch_id: str) -> str:
        batch = self.get(batch_id)
        if batch.status(self._clock()) is not ProcessingStatus.ENDED:
            raise invalid(f"message_batch {batch_id} is still {batch.status(self._clock()).value}; "
                          "cancel it and wait for it to end before deleting it")
        del self._batches[batch_id]
        return batch_id

    def results(self, batch_id: str) -> list[dict[str, Any]]:
        batch = self.get(batch_id)
        if batch.results is None:
            raise invalid(f"message_batch {batch_id} has not ended yet "
                          f"({batch.status(self._clock()).value}); its results are not available")
        return batch.results

    # ---- Ending ---------------------------------------------------------------------------------
    def _settle(self, batch: SimBatch) -> None:
        """Answer the batch's requests once it has ended (lazily: at the first read after its end)."""
        if batch.results is not None:
            return
        ends_at, fate = batch.end_time()
        if self._clock() < ends_at:
            return
        results = [self._result(entry, fate) for entry in batch.entries]
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for result in results:
            kind = result["result"]["type"]
            counts[kind] += 1
            self.results_by_type[kind] = self.results_by_type.get(kind, 0) + 1
        batch.results, batch.counts, batch.ended_at = results, counts, ends_at

    def _result(self, entry: _Entry, fate: str) -> dict[str, Any]:
        if fate != "answered":
            return {"custom_id": entry.custom_id, "result": {"type": fate}}
        outcome = self.outcomes.outcome(entry.custom_id)
        if outcome is BatchOutcome.EXPIRED:
            return {"custom_id": entry.custom_id, "result": {"type": "expired"}}
        error = entry.error
        if error is None and outcome is BatchOutcome.ERRORED:
            error = ApiError(500, "api_error", "Internal server error (simulated batch fault)")
        if error is None:
            assert entry.request is not None
            try:
                message = self._answer(entry.request)
            except ApiError as exc:
                error = exc
            else:
                return {"custom_id": entry.custom_id, "result": {"type": "succeeded", "message": message}}
        return {"custom_id": entry.custom_id, "result": {"type": "errored", "error": error.body()}}


def batch_body(batch: SimBatch, now: float, base_url: str) -> dict[str, Any]:
    """The MessageBatch object the API answers with."""
    status = batch.status(now)
    total = len(batch.entries)
    counts = batch.counts if status is ProcessingStatus.ENDED and batch.counts else {
        "processing": total, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    ended = status is ProcessingStatus.ENDED
    return {
        "id": batch.id,
        "type": "message_batch",
        "processing_status": status.value,
        "request_counts": counts,
        "created_at": _rfc3339(batch.created_at),
        "expires_at": _rfc3339(batch.expires_at),
        "ended_at": _rfc3339(batch.ended_at) if ended else None,
        "cancel_initiated_at": _rfc3339(batch.cancel_initiated_at),
        "archived_at": None,
        "results_url": f"{base_url.rstrip('/')}/v1/messages/batches/{batch.id}/results" if ended else None,
    }

"""The API's operations as calls (what to send) and parsers (what the answer means), shared by the
sync and the async client so that they cannot drift apart."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from smallfirst_client._core import MAX_WAIT_PER_CALL_S, Call, clean_params, creating_call
from smallfirst_client.models import Priority, TierHint


def job_body(task: str, input: Mapping[str, str], *, tier: TierHint | str = TierHint.AUTO,
             priority: Priority | str = Priority.NORMAL, deadline_s: float | None = None, local_only: bool = False,
             metadata: Mapping[str, str] | None = None, callback_url: str | None = None) -> dict[str, Any]:
    """The body of one job (`submit`, and each item of `submit_batch`)."""
    body: dict[str, Any] = {"task": task, "input": dict(input), "tier": str(tier), "priority": str(priority),
                            "local_only": local_only}
    if deadline_s is not None:
        body["deadline_s"] = deadline_s
    if metadata:
        body["metadata"] = dict(metadata)
    if callback_url is not None:
        body["callback_url"] = callback_url
    return body


def submit(body: dict[str, Any], idempotency_key: str | None) -> Call:
    return creating_call("POST", "/v1/jobs", body, idempotency_key)


def submit_batch(jobs: Sequence[Mapping[str, Any]], all_or_nothing: bool, idempotency_key: str | None) -> Call:
    return creating_call("POST", "/v1/jobs/batch", {"jobs": [dict(j) for j in jobs], "all_or_nothing": all_or_nothing},
                         idempotency_key)


def get(job_id: str, wait_s: float = 0.0) -> Call:
    wait = min(max(0.0, wait_s), MAX_WAIT_PER_CALL_S)
    # The HTTP timeout must outlast the long-poll.
    return Call("GET", f"/v1/jobs/{job_id}", params={"wait": wait} if wait > 0 else None,
                timeout_s=wait + 30.0 if wait > 0 else None)


def _time(value: datetime | float | None) -> str | float | None:
    return value.isoformat() if isinstance(value, datetime) else value


def list_jobs(*, limit: int | None, cursor: str | None, status: str | None, task: str | None, tier: str | None,
              created_after: datetime | float | None, created_before: datetime | float | None) -> Call:
    return Call("GET", "/v1/jobs", params=clean_params({
        "limit": limit, "cursor": cursor, "status": status, "task": task, "tier": tier,
        "created_after": _time(created_after), "created_before": _time(created_before)}))


def cancel(job_id: str, idempotency_key: str | None) -> Call:
    return creating_call("POST", f"/v1/jobs/{job_id}/cancel", None, idempotency_key)


def feedback(job_id: str, answer: Any, comment: str | None, idempotency_key: str | None) -> Call:
    body: dict[str, Any] = {"answer": answer}
    if comment is not None:
        body["comment"] = comment
    return creating_call("POST", f"/v1/jobs/{job_id}/feedback", body, idempotency_key)


def replay(job_id: str, deadline_s: float | None, idempotency_key: str | None) -> Call:
    body = {"deadline_s": deadline_s} if deadline_s is not None else None
    return creating_call("POST", f"/v1/jobs/{job_id}/replay", body, idempotency_key)


def list_dead_letters(*, limit: int | None, cursor: str | None, reason: str | None,
                      failed_after: datetime | float | None, failed_before: datetime | float | None) -> Call:
    return Call("GET", "/v1/dead-letters", params=clean_params({
        "limit": limit, "cursor": cursor, "reason": reason, "failed_after": _time(failed_after),
        "failed_before": _time(failed_before)}))


def _epoch(value: datetime | float | None) -> float | None:
    return value.timestamp() if isinstance(value, datetime) else value


def replay_dead_letters(*, reason: str | None, failed_after: datetime | float | None,
                        failed_before: datetime | float | None, limit: int, deadline_s: float | None,
                        idempotency_key: str | None) -> Call:
    return creating_call("POST", "/v1/dead-letters/replay", clean_params({
        "reason": reason, "failed_after": _epoch(failed_after), "failed_before": _epoch(failed_before),
        "limit": limit, "deadline_s": deadline_s}), idempotency_key)

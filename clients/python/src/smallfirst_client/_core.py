"""What the sync and the async client share: building requests, the retry policy, decoding answers.

Retries: a request is retried after a transport failure (connection refused or dropped, timeout)
and after 429, 503 and 409 `idempotency_key_in_flight`, waiting the server's `Retry-After` when it
gives one, else an exponential backoff with jitter. A POST is retried only when it carries an
`Idempotency-Key`, which the client adds to every creating call and keeps across the retries of one
call: the server answers a repeat with the first response, so no retry creates a second job.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from smallfirst_client.errors import ApiError

IDEMPOTENCY_HEADER = "Idempotency-Key"
# The server answers a long-poll after at most this long; `wait` loops over calls this long.
MAX_WAIT_PER_CALL_S = 60.0
RETRY_STATUSES = frozenset({429, 503})
IN_FLIGHT_CODE = "idempotency_key_in_flight"
USER_AGENT = "smallfirst-client/0.1.0"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one call."""

    max_retries: int = 5
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 8.0
    # A Retry-After longer than this is not waited for: the error is raised instead.
    max_retry_after_s: float = 60.0

    def backoff_s(self, retry: int) -> float:
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** retry)
        return random.uniform(ceiling / 2, ceiling)  # jitter, not a secret


@dataclass
class Call:
    """One logical API call; its retries reuse it (and so its idempotency key) unchanged."""

    method: str
    path: str
    params: dict[str, Any] | None = None
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float | None = None

    @property
    def retry_safe(self) -> bool:
        return self.method == "GET" or IDEMPOTENCY_HEADER in self.headers


def new_idempotency_key() -> str:
    return f"sfc-{uuid.uuid4()}"


def creating_call(method: str, path: str, json: Any = None, idempotency_key: str | None = None) -> Call:
    """A call that creates or changes something: it carries an idempotency key (a fresh one unless given)."""
    return Call(method, path, json=json, headers={IDEMPOTENCY_HEADER: idempotency_key or new_idempotency_key()})


def clean_params(params: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in params.items() if value is not None}


def retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def api_error(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, str(error["code"]), str(error["message"]), error.get("details"),
                        retry_after_s(response))
    except (ValueError, KeyError, TypeError):
        return ApiError(response.status_code, "http_error", response.text[:500] or response.reason_phrase,
                        retry_after_s=retry_after_s(response))


def retry_delay_s(policy: RetryPolicy, call: Call, retry: int, response: httpx.Response | None) -> float | None:
    """How long to wait before retrying `call` (the `retry`-th retry), or None to stop."""
    if retry >= policy.max_retries or not call.retry_safe:
        return None
    if response is None:
        return policy.backoff_s(retry)
    in_flight = response.status_code == 409 and _error_code(response) == IN_FLIGHT_CODE
    if response.status_code not in RETRY_STATUSES and not in_flight:
        return None
    after = retry_after_s(response)
    if after is None:
        return policy.backoff_s(retry)
    return after if after <= policy.max_retry_after_s else None


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def headers_for(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT}

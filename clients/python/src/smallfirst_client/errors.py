"""Errors of the client: what the API answered (`ApiError`, with its machine-readable `code`), or
that it could not be reached (`TransportFailure`) after every retry."""

from __future__ import annotations

from typing import Any


class SmallfirstClientError(Exception):
    """Base of the client's errors."""


class ApiError(SmallfirstClientError):
    """The API answered with an error: `status` (HTTP), `code`, `message`, `details`."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after_s = retry_after_s


class TransportFailure(SmallfirstClientError):
    """No answer from the API (connection refused or dropped, timeout) after every retry."""


class WaitTimeout(SmallfirstClientError):
    """`wait` gave up: the job had not ended within the total timeout. `job` is its last state."""

    def __init__(self, job: Any, timeout_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status.value} after {timeout_s:.0f} s")
        self.job = job
        self.timeout_s = timeout_s

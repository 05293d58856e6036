"""One error taxonomy for every service: a machine-readable `code` and what may be done about it.

Every error the project raises on purpose is a `SmallfirstError`. Its `disposition` says what the
outcome of a job attempt that ended with it is allowed to be:

- `RETRY`: the infrastructure failed (a provider's 429/529/5xx, an inference service that is down,
  Redis away). The same work may succeed later: try again, with a backoff, until the job's deadline.
- `ESCALATE`: the small tier could not give an answer for this input (the input does not fit the
  model, the engine failed on it). The frontier tier can still answer it.
- `FINAL`: trying again changes nothing (a catalog mistake, a request the provider refuses as
  malformed, a bad API key). The job fails with the error's code, loudly.

An error may be both retryable and escalatable (an inference service that is down: wait for it or
hand the job to the frontier, as the task's policy says); `escalatable` and `retryable` say so.

Errors of a client's request (`RequestError` and its kinds) are raised below the HTTP layer too;
the API maps each kind to an HTTP status at its edge (`smallfirst.api.errors`), nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar

from smallfirst.common.jobs import ErrorInfo


class Disposition(StrEnum):
    RETRY = "retry"
    ESCALATE = "escalate"
    FINAL = "final"


class SmallfirstError(Exception):
    """Base of every error the project raises on purpose.

    `code` is stable and machine-readable (it goes into job errors, escalation reasons, metrics and
    API error bodies); a subclass sets its default, an instance may narrow it (`code=`).
    `retry_after_s`, when set, is the earliest time trying again makes sense.
    """

    code: ClassVar[str] = "internal_error"
    disposition: ClassVar[Disposition] = Disposition.FINAL
    # Retryable errors that the small tier may also hand to the frontier instead of waiting.
    also_escalatable: ClassVar[bool] = False

    def __init__(self, message: str, *, code: str | None = None, details: Mapping[str, Any] | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance narrows its class's default code
        self.details: dict[str, Any] = dict(details or {})
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        return self.disposition is Disposition.RETRY

    @property
    def escalatable(self) -> bool:
        return self.disposition is Disposition.ESCALATE or (self.retryable and self.also_escalatable)

    @property
    def final(self) -> bool:
        return self.disposition is Disposition.FINAL

    def info(self) -> ErrorInfo:
        """The error as stored on a job: code, message, details (no internal host names)."""
        return ErrorInfo(code=self.code, message=self.message, details=dict(self.details))

    def __str__(self) -> str:
        return self.message


# ---- infrastructure, configuration --------------------------------------------------------------
class InfrastructureError(SmallfirstError):
    """A dependency did not answer (Redis, the inference service, the frontier provider)."""

    code = "unavailable"
    disposition = Disposition.RETRY


class ConfigurationError(SmallfirstError):
    """The deployment's configuration is wrong (catalog, prices, settings): fix it, do not retry.

    Raised at start-up where it can be seen there; a job that meets one fails with its code."""

    code = "misconfigured"
    disposition = Disposition.FINAL


# ---- a client's request (mapped to HTTP at the API's edge) --------------------------------------
class RequestError(SmallfirstError):
    """A client's request cannot be served as it was asked."""

    code = "invalid_request"


class InvalidRequest(RequestError):
    code = "invalid_request"


class NotFound(RequestError):
    code = "not_found"


class Conflict(RequestError):
    code = "conflict"


class LimitExceeded(RequestError):
    """A quota or rate limit; `retry_after_s` says when to try again, when it is known."""

    code = "rate_limited"


class Unauthenticated(RequestError):
    code = "unauthorized"


class ServiceUnavailable(RequestError):
    """The service cannot take the request now (its store is away, it is shedding load)."""

    code = "unavailable"

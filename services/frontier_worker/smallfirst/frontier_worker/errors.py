"""Why a frontier call produced no answer: typed errors, each with the job error code it maps to."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from smallfirst.common.jobs import ErrorInfo


@dataclass(frozen=True)
class RetryRecord:
    """One failed provider call that was retried (or would have been, had the budget allowed)."""

    attempt: int
    status_code: int | None  # None: no HTTP answer (connection dropped, timed out)
    error_type: str  # the API's error type (rate_limit_error, overloaded_error, ...) or the exception's name
    message: str
    # The provider's retry-after, when it sent one.
    retry_after_s: float | None
    # How long the executor waited before the next attempt (0 when it gave up instead).
    wait_s: float


class FrontierError(Exception):
    """Base of the frontier executor's errors; `code` is the job's error code."""

    code: ClassVar[str] = "frontier_error"

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None,
                 retries: tuple[RetryRecord, ...] = (), limiter_wait_s: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.request_id = request_id
        self.retries = retries
        self.limiter_wait_s = limiter_wait_s

    def error_info(self) -> ErrorInfo:
        details: dict[str, object] = {"provider_retries": len(self.retries),
                                      "limiter_wait_s": round(self.limiter_wait_s, 3)}
        if self.status_code is not None:
            details["status_code"] = self.status_code
        if self.request_id:
            details["request_id"] = self.request_id
        return ErrorInfo(code=self.code, message=self.message, details=details)


class FrontierUnavailable(FrontierError):
    """The provider (or the shared rate limit) did not serve the call within the job's retry budget."""

    code = "frontier_unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None, status_code: int | None = None,
                 request_id: str | None = None, retries: tuple[RetryRecord, ...] = (),
                 limiter_wait_s: float = 0.0) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id, retries=retries,
                         limiter_wait_s=limiter_wait_s)
        # When trying again makes sense at the earliest (a hint for re-queueing the job).
        self.retry_after_s = retry_after_s

    def error_info(self) -> ErrorInfo:
        info = super().error_info()
        if self.retry_after_s is not None:
            info.details["retry_after_s"] = round(self.retry_after_s, 3)
        return info


class FrontierBadRequest(FrontierError):
    """The provider refused the request as malformed (400 and kin); retrying cannot help."""

    code = "frontier_bad_request"


class FrontierAuthError(FrontierError):
    """The provider refused the API key (401) or its permissions (403)."""

    code = "frontier_auth_failed"


class FrontierConfigurationError(FrontierError):
    """The deployment cannot make this call: no price for the model, a limit no request can fit."""

    code = "frontier_misconfigured"


class PromptRenderError(FrontierError):
    """The job's input does not fill the task's prompt templates."""

    code = "invalid_input"

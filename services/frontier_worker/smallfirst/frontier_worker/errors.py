"""Why a frontier call produced no answer: typed errors, each with the job error code it maps to."""

from __future__ import annotations

from dataclasses import dataclass

from smallfirst.common.errors import Disposition, SmallfirstError


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


class FrontierError(SmallfirstError):
    """Base of the frontier executor's errors; `code` is the job's error code.

    Its details (what the provider said, how often it was retried, how long the shared rate limit
    held the call) go into the job's error, and no more: no provider message text, which can quote
    the request, and no host names."""

    code = "frontier_error"

    def __init__(self, message: str, *, status_code: int | None = None, request_id: str | None = None,
                 retries: tuple[RetryRecord, ...] = (), limiter_wait_s: float = 0.0,
                 retry_after_s: float | None = None) -> None:
        details: dict[str, object] = {"provider_retries": len(retries), "limiter_wait_s": round(limiter_wait_s, 3)}
        if status_code is not None:
            details["status_code"] = status_code
        if request_id:
            details["request_id"] = request_id
        if retry_after_s is not None:
            details["retry_after_s"] = round(retry_after_s, 3)
        super().__init__(message, details=details, retry_after_s=retry_after_s)
        self.status_code = status_code
        self.request_id = request_id
        self.retries = retries
        self.limiter_wait_s = limiter_wait_s


class FrontierUnavailable(FrontierError):
    """The provider (or the shared rate limit) did not serve the call within the attempt's retry
    budget. The provider may answer later: the job is retried with a backoff until its deadline."""

    code = "frontier_unavailable"
    disposition = Disposition.RETRY


class FrontierBadRequest(FrontierError):
    """The provider refused the request as malformed (400 and kin); retrying cannot help."""

    code = "frontier_rejected"


class FrontierAuthError(FrontierError):
    """The provider refused the API key (401) or its permissions (403)."""

    code = "frontier_auth_failed"


class FrontierConfigurationError(FrontierError):
    """The deployment cannot make this call: no price for the model, a limit no request can fit."""

    code = "frontier_misconfigured"


class PromptRenderError(FrontierError):
    """The job's input does not fill the task's prompt templates."""

    code = "invalid_input"


class FrontierCancelled(FrontierError):
    """The job was cancelled while its frontier call was in flight: the call was cut, not retried."""

    code = "cancelled"


class FrontierBatchFailed(FrontierError):
    """A batched request came back without an answer (`errored` with a transient error, `expired`, or
    `canceled` while its job still runs). The job is retried, in a later batch or in real time, until
    its deadline."""

    code = "frontier_batch_failed"
    disposition = Disposition.RETRY

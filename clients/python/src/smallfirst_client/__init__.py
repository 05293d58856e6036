"""smallfirst-client: the Python client of the smallfirst job API (sync and asyncio)."""

from smallfirst_client._calls import job_body
from smallfirst_client._core import IDEMPOTENCY_HEADER, RetryPolicy
from smallfirst_client.client import AsyncClient, Client
from smallfirst_client.errors import ApiError, SmallfirstClientError, TransportFailure, WaitTimeout
from smallfirst_client.models import (
    Attempt,
    BatchItemResult,
    BatchResponse,
    BulkReplayResponse,
    DeadLetter,
    DeadLetterList,
    ErrorInfo,
    Job,
    JobList,
    JobStatus,
    Priority,
    Tier,
    TierHint,
)
from smallfirst_client.webhooks import WebhookVerificationError, verify

__all__ = [
    "IDEMPOTENCY_HEADER",
    "ApiError",
    "AsyncClient",
    "Attempt",
    "BatchItemResult",
    "BatchResponse",
    "BulkReplayResponse",
    "Client",
    "DeadLetter",
    "DeadLetterList",
    "ErrorInfo",
    "Job",
    "JobList",
    "JobStatus",
    "Priority",
    "RetryPolicy",
    "SmallfirstClientError",
    "Tier",
    "TierHint",
    "TransportFailure",
    "WaitTimeout",
    "WebhookVerificationError",
    "job_body",
    "verify",
]

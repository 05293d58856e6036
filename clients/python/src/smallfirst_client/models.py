"""The API's resources as typed models.

Written by hand and checked against the API's OpenAPI document by a test of the smallfirst
repository (each model here has exactly the fields of its schema), so a field added or renamed on
the server fails that test until the client follows. Unknown fields a newer server sends are
kept (`extra="allow"`), so an older client does not break on them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ESCALATED = "escalated"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class Tier(StrEnum):
    SMALL = "small"
    FRONTIER = "frontier"


class TierHint(StrEnum):
    AUTO = "auto"
    SMALL = "small"
    FRONTIER = "frontier"


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class Usage(_Model):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Verdict(_Model):
    passed: bool
    reasons: list[str] = Field(default_factory=list)


class ErrorInfo(_Model):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class RouteDecision(_Model):
    tier: Tier
    reason: str
    detail: str = ""
    # How the job's frontier attempts are sent (`realtime` or `batch`), and which setting chose it.
    frontier_mode: str = "realtime"
    frontier_mode_source: str = ""


class Attempt(_Model):
    number: int
    tier: Tier
    model: str
    worker: str = ""
    outcome: str = "running"
    started_at: float
    ended_at: float | None = None
    latency_ms: float | None = None
    queue_wait_ms: float | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    billed: bool = False
    # Sent in a Message Batch (billed at the batch price).
    batched: bool = False
    estimated_frontier_cost_usd: float | None = None
    answer: Any = None
    confidence: float | None = None
    verdict: Verdict | None = None
    error: ErrorInfo | None = None


class Feedback(_Model):
    """A person's verdict on a job's result (POST /v1/jobs/{id}/feedback): the answer it should have had."""

    answer: Any
    comment: str = ""
    created_at: float
    # Whether it is the job's result; if not, the tier that served the result made an error.
    agrees: bool
    served_by: Tier | None = None


class Job(_Model):
    object: str = "job"
    id: str
    tenant: str
    task: str
    input: dict[str, str]
    status: JobStatus = JobStatus.QUEUED
    priority: Priority = Priority.NORMAL
    tier_hint: TierHint = TierHint.AUTO
    local_only: bool = False
    # False: the job (or its tenant) opted out; its input and answer never become a training example.
    learning: bool = True
    metadata: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = None
    # The job's own choice of how its frontier attempts are sent (batch, realtime, auto); None: the
    # tenant's or the task's. What was decided is `route.frontier_mode`.
    frontier_mode: str | None = None
    route: RouteDecision
    attempts: list[Attempt] = Field(default_factory=list)
    result: Any = None
    error: ErrorInfo | None = None
    escalation_reasons: list[str] = Field(default_factory=list)
    created_at: float
    updated_at: float
    queued_at: float
    ended_at: float | None = None
    deadline_at: float | None = None
    retry_at: float | None = None
    trace_id: str | None = None
    # How long the job is kept after its last change (the tenant's retention; None: the deployment's).
    retention_s: int | None = None
    dead_letter: str | None = None
    replays: int = 0
    replayed_at: float | None = None
    feedback: Feedback | None = None
    cost_usd: float

    @property
    def terminal(self) -> bool:
        return self.status.terminal


class JobList(_Model):
    object: str = "list"
    data: list[Job]
    has_more: bool
    next_cursor: str | None = None


class ErrorDetail(_Model):
    code: str
    message: str
    details: Any = None


class BatchItemResult(_Model):
    index: int
    status: int
    job: Job | None = None
    error: ErrorDetail | None = None


class BatchResponse(_Model):
    object: str = "batch"
    accepted: int
    rejected: int
    results: list[BatchItemResult]


class DeadLetter(_Model):
    object: str = "dead_letter"
    id: str
    job_id: str | None = None
    tenant: str
    task: str | None = None
    reason: str
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    failed_at: float
    attempts: int = 0
    replays: int = 0


class DeadLetterList(_Model):
    object: str = "list"
    data: list[DeadLetter]
    has_more: bool
    next_cursor: str | None = None


class BulkReplayResponse(_Model):
    object: str = "bulk_replay"
    replayed: list[str]
    skipped: list[str] = Field(default_factory=list)
    has_more: bool


# Client model -> the OpenAPI component it mirrors (the schema test walks this).
OPENAPI_COMPONENTS: dict[str, type[BaseModel]] = {
    "JobResource": Job,
    "AttemptResource": Attempt,
    "Usage": Usage,
    "Verdict": Verdict,
    "ErrorInfo": ErrorInfo,
    "RouteDecision": RouteDecision,
    "JobList": JobList,
    "ErrorDetail": ErrorDetail,
    "BatchItemResult": BatchItemResult,
    "BatchResponse": BatchResponse,
    "DeadLetter": DeadLetter,
    "DeadLetterList": DeadLetterList,
    "BulkReplayResponse": BulkReplayResponse,
}

"""Request and response models of the ingest API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from smallfirst.common.jobs import Attempt, Job, JobStatus, Priority, Tier, TierHint

MAX_METADATA_ENTRIES = 50
MAX_METADATA_KEY_CHARS = 40
MAX_METADATA_VALUE_CHARS = 500
MAX_CALLBACK_URL_CHARS = 2048
MAX_TASK_NAME_CHARS = 64

MetadataKey = Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[StrictStr, Field(max_length=MAX_METADATA_VALUE_CHARS)]


class JobRequest(BaseModel):
    """A job to run: a task of the catalog and its input."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{
            "task": "banking77_intent",
            "input": {"text": "My card still has not arrived after two weeks."},
            "priority": "normal",
            "metadata": {"ticket": "T-1042"},
        }],
    })

    task: str = Field(min_length=1, max_length=MAX_TASK_NAME_CHARS, description="Name of a task in the catalog.")
    input: dict[str, StrictStr] = Field(
        description="The task's input fields (see GET /v1/tasks/{name}, `input_fields`), each a string.")
    tier: TierHint = Field(
        default=TierHint.AUTO,
        description="`auto` lets the routing policy choose; `small` or `frontier` asks for that tier first.")
    priority: Priority = Priority.NORMAL
    local_only: StrictBool = Field(default=False, description="Never send this job to the frontier tier.")
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_ENTRIES)] = Field(
        default_factory=dict,
        description=f"Up to {MAX_METADATA_ENTRIES} string pairs kept with the job "
                    f"(keys up to {MAX_METADATA_KEY_CHARS}, values up to {MAX_METADATA_VALUE_CHARS} characters).")
    callback_url: str | None = Field(
        default=None, max_length=MAX_CALLBACK_URL_CHARS,
        description="Receives the job resource when the job ends, signed as Standard Webhooks.")


class BatchRequest(BaseModel):
    """Several jobs in one request; each item is judged on its own unless `all_or_nothing`."""

    model_config = ConfigDict(extra="forbid")

    # Items are validated one by one by the service, so that one bad item yields a per-item error
    # rather than rejecting the request; the schema still documents them as JobRequest.
    jobs: Annotated[
        list[dict[str, Any]],
        WithJsonSchema({"type": "array", "items": {"$ref": "#/components/schemas/JobRequest"}, "minItems": 1}),
    ] = Field(min_length=1)
    all_or_nothing: StrictBool = Field(
        default=False, description="Reject the whole batch (storing nothing) if any item is invalid.")


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. `unknown_task`.")
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AttemptResource(Attempt):
    task_id: SkipJsonSchema[str] = ""
    lease_expires_at: SkipJsonSchema[float] = 0.0


class JobResource(Job):
    """The job resource: what was submitted, where it was routed, every attempt, and the result."""

    object: Literal["job"] = "job"
    attempts: list[AttemptResource] = Field(default_factory=list)  # type: ignore[assignment]
    cost_usd: float = Field(description="Cost of every billed attempt, in USD.")
    version: SkipJsonSchema[int] = 0
    traceparent: SkipJsonSchema[str | None] = None


class BatchItemResult(BaseModel):
    index: int = Field(description="Position of the item in the request.")
    status: int = Field(description="What a single POST /v1/jobs would have answered (202 when accepted).")
    job: JobResource | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    object: Literal["batch"] = "batch"
    accepted: int
    rejected: int
    results: list[BatchItemResult]


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobResource]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page.")


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]


class TierCounts(BaseModel):
    small: int = 0
    frontier: int = 0


class TierCosts(BaseModel):
    small: float = 0.0
    frontier: float = 0.0


class TaskStats(BaseModel):
    task: str
    jobs_submitted: int = Field(description="Jobs accepted.")
    jobs_ended: int = Field(description="Jobs that reached succeeded, failed or cancelled.")
    jobs_in_progress: int
    by_status: dict[str, int] = Field(description="Ended jobs by final status.")
    routed: TierCounts = Field(description="Jobs by the tier the routing policy sent them to first.")
    served: TierCounts = Field(description="Succeeded jobs by the tier whose answer became the result.")
    escalated: int = Field(description="Ended jobs that went from the small tier to the frontier tier.")
    escalation_rate: float | None = Field(
        description="escalated / (jobs the small tier answered + escalated): the share of small-tier "
                    "outcomes handed on to the frontier tier. None before any.")
    escalation_reasons: dict[str, int]
    errors: dict[str, int] = Field(description="Failed jobs by error code.")
    cost_usd: float
    cost_usd_by_tier: TierCosts
    input_tokens: int
    output_tokens: int
    estimated_frontier_cost_usd: float = Field(
        description="What the frontier tier would have charged for the jobs the small tier served.")
    savings_usd: float = Field(description="estimated_frontier_cost_usd minus what those jobs cost.")


class StatsResponse(BaseModel):
    object: Literal["stats"] = "stats"
    tenant: str
    tasks: list[TaskStats]
    totals: TaskStats = Field(description="The same figures over every task (`task` is `*`).")


class Health(BaseModel):
    status: str
    checks: dict[str, Any] = Field(default_factory=dict)


__all__ = [
    "BatchItemResult",
    "BatchRequest",
    "BatchResponse",
    "ErrorDetail",
    "ErrorResponse",
    "Health",
    "JobList",
    "JobRequest",
    "JobResource",
    "JobStatus",
    "StatsResponse",
    "TaskList",
    "TaskStats",
    "Tier",
    "TierCosts",
    "TierCounts",
]

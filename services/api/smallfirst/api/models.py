"""Request and response models of the ingest API (they also make the OpenAPI document)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, WithJsonSchema
from pydantic.json_schema import SkipJsonSchema

from smallfirst.common.deadletters import DeadLetter
from smallfirst.common.jobs import Attempt, FrontierMode, Job, JobStatus, Priority, Tier, TierHint

MAX_METADATA_ENTRIES = 50
# Year 5138: later than any job's time, small enough for a millisecond score.
MAX_UNIX_TIME_S = 1e11
MAX_METADATA_KEY_CHARS = 40
MAX_METADATA_VALUE_CHARS = 500
MAX_CALLBACK_URL_CHARS = 2048
MAX_TASK_NAME_CHARS = 64

MetadataKey = Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = Annotated[StrictStr, Field(max_length=MAX_METADATA_VALUE_CHARS)]


# A week: the longest a job may wait for a provider that keeps failing.
MAX_DEADLINE_S = 7 * 24 * 3600


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
    deadline_s: float | None = Field(
        default=None, gt=0, le=MAX_DEADLINE_S,
        description="Seconds from submission within which the job must end. Failures of the infrastructure "
                    "(a provider's 429/529/5xx, an inference service down) are retried with a backoff until then; "
                    "past it the job fails with `deadline_exceeded`. Default: by priority (see the README).")
    local_only: StrictBool = Field(default=False, description="Never send this job to the frontier tier.")
    learning: StrictBool = Field(
        default=True, description="`false`: this job's input and answer never become a training example.")
    frontier_mode: FrontierMode | None = Field(
        default=None,
        description="How the job's frontier attempts are sent: `realtime` (one Messages call), `batch` (a Message "
                    "Batch at the batch price, answered within the provider's batch window) or `auto` (`low` "
                    "priority goes to batches). Default: the tenant's setting, else the task's.")
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
    savings_usd: float = Field(description="estimated_frontier_cost_usd minus what those jobs cost: saved by the "
                                           "small tier.")
    feedback: int = Field(default=0, description="Jobs given feedback (POST /v1/jobs/{id}/feedback).")
    shadow_samples: int = Field(default=0, description="Kept small-tier answers also answered by the frontier.")
    shadow_agreement: float | None = Field(
        default=None, description="Share of shadow samples where the frontier agreed with the small tier.")
    shadow_agreement_by_label: dict[str, float] = Field(default_factory=dict)
    shadow_cost_usd: float = Field(default=0.0, description="What the shadow samples cost at the frontier.")
    feedback_errors: dict[str, int] = Field(
        default_factory=dict, description="Feedback that corrected the result, by the tier that served it.")
    attempts_batched: int = Field(default=0, description="Frontier attempts sent in Message Batches.")
    batch_cost_usd: float = Field(default=0.0, description="What the batched attempts cost, at the batch price "
                                                           "(part of cost_usd).")
    batch_savings_usd: float = Field(default=0.0, description="What the batched attempts would have cost in real "
                                                              "time less what they cost: saved by batching.")


class StatsResponse(BaseModel):
    object: Literal["stats"] = "stats"
    tenant: str
    tasks: list[TaskStats]
    totals: TaskStats = Field(description="The same figures over every task (`task` is `*`).")
    budget: dict[str, Any] | None = Field(
        default=None, description="The tenant's frontier spend budget: policy, status (ok, warning, exceeded) "
                                  "and per period (day, month) limit_usd, spent_usd, used_ratio, resets_at.")


class DeadLetterList(BaseModel):
    object: str = "list"
    data: list[DeadLetter]
    has_more: bool
    next_cursor: str | None = Field(default=None, description="Pass as `cursor` for the next page.")


class ReplayRequest(BaseModel):
    """Optional body of `POST /v1/jobs/{id}/replay`."""

    model_config = ConfigDict(extra="forbid")

    deadline_s: float | None = Field(
        default=None, gt=0, le=MAX_DEADLINE_S,
        description="Seconds from the replay within which the new run must end. Default: the job's own "
                    "deadline, measured from its submission.")


class BulkReplayRequest(BaseModel):
    """Replay every dead letter of the tenant that matches (`POST /v1/dead-letters/replay`)."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=64, description="Only entries with this reason.")
    # Bounded so that a time is a time: the entries are scored in milliseconds, and a score out of
    # this range is an error of Redis's, not the client's.
    failed_after: float | None = Field(default=None, ge=0, le=MAX_UNIX_TIME_S,
                                       description="Failed at or after (Unix s).")
    failed_before: float | None = Field(default=None, ge=0, le=MAX_UNIX_TIME_S,
                                        description="Failed before (Unix s).")
    limit: int = Field(default=100, ge=1, le=1000, description="At most this many replays per call.")
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S,
                                     description="As for a single replay.")


class BulkReplayResponse(BaseModel):
    object: str = "bulk_replay"
    replayed: list[str] = Field(description="Ids of the jobs replayed by this call.")
    skipped: list[str] = Field(default_factory=list,
                               description="Entries that were no longer dead-lettered when their turn came.")
    has_more: bool = Field(description="More entries match: call again.")


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

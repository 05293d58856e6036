"""The job resource: what a tenant submitted, where it was routed, every attempt, and the result."""

from __future__ import annotations

import secrets
import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ESCALATED = "escalated"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


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


class FrontierMode(StrEnum):
    """How a job's frontier attempts are sent: one Messages call each (`realtime`), or in a Message
    Batch at the batch price, answered within the provider's batch window (`batch`). `auto` sends
    `low` priority and shadow work to batches and the rest in real time."""

    BATCH = "batch"
    REALTIME = "realtime"
    AUTO = "auto"


class RouteReason(StrEnum):
    """Why the routing policy picked a tier; stored on the job and counted in metrics."""

    HINT = "tier_hint"
    LOCAL_ONLY = "local_only"
    CONTEXT_LENGTH = "input_exceeds_small_context"
    TASK_DEFAULT = "task_default"


class RouteDecision(BaseModel):
    tier: Tier
    reason: RouteReason
    detail: str = ""
    # How its frontier attempts go out (never `auto`: resolved at routing), and which level chose it
    # ("job", "tenant", "task", each with ":auto:<why>" when that level said auto).
    frontier_mode: FrontierMode = FrontierMode.REALTIME
    frontier_mode_source: str = ""


class Usage(BaseModel):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Verdict(BaseModel):
    """A validation verdict: passed, or the reasons (machine-readable codes plus a message) it failed."""

    passed: bool
    reasons: list[str] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    code: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class AttemptOutcome(StrEnum):
    RUNNING = "running"
    ACCEPTED = "accepted"  # answer passed validation and became the result
    REJECTED = "rejected"  # answer failed validation
    ERROR = "error"  # no answer (provider or inference error)
    RETRIED = "retried"  # no answer because a dependency failed; the job waits for another attempt
    ABANDONED = "abandoned"  # the worker holding it disappeared; not billed
    CANCELLED = "cancelled"


class Attempt(BaseModel):
    number: int
    tier: Tier
    model: str
    worker: str = ""
    # The Celery task id of the delivery that runs this attempt, and the lease it holds the job by:
    # a redelivered message may take over an attempt only after its lease has expired.
    task_id: str = ""
    lease_expires_at: float = 0.0
    # A frontier attempt sent in a Message Batch (billed at the batch price; its lease spans the
    # batch window).
    batched: bool = False
    outcome: AttemptOutcome = AttemptOutcome.RUNNING
    started_at: float
    ended_at: float | None = None
    latency_ms: float | None = None
    queue_wait_ms: float | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    billed: bool = False
    # For small-tier attempts: what the frontier tier would have charged for the same tokens.
    estimated_frontier_cost_usd: float | None = None
    answer: Any = None
    confidence: float | None = None
    verdict: Verdict | None = None
    error: ErrorInfo | None = None


# Error codes whose message and details come from infrastructure (a provider, the inference
# service, Redis): the API shows the code with a fixed text instead.
_INTERNAL_ERROR_PREFIXES = ("frontier_", "inference_", "small_tier_")
_INTERNAL_ERROR_CODES = frozenset({"unavailable", "misconfigured", "internal_error", "store_conflict", "corrupt_job",
                                   "task_not_in_catalog"})


def public_error(error: dict[str, Any] | None) -> dict[str, Any] | None:
    if error is None:
        return None
    code = str(error.get("code", ""))
    if code in _INTERNAL_ERROR_CODES or code.startswith(_INTERNAL_ERROR_PREFIXES):
        return {"code": code, "message": f"the attempt failed: {code.replace('_', ' ')}", "details": {}}
    return error


def new_job_id() -> str:
    # Time-ordered prefix so ids sort roughly by creation; random suffix so they cannot be guessed.
    return f"job_{int(time.time() * 1000):013x}{secrets.token_hex(8)}"


def new_job_ids(count: int) -> list[str]:
    """`count` ids like new_job_id's, from one draw of randomness (each draw is a system call)."""
    prefix = f"job_{int(time.time() * 1000):013x}"
    suffixes = secrets.token_hex(8 * count)
    return [prefix + suffixes[16 * i:16 * (i + 1)] for i in range(count)]


class Feedback(BaseModel):
    """A person's verdict on a job's result: the answer it should have had."""

    answer: Any
    comment: str = ""
    created_at: float
    # Whether it is the job's result; if not, the tier that served the result made an error.
    agrees: bool
    served_by: Tier | None = None


class Job(BaseModel):
    model_config = ConfigDict(use_enum_values=False)

    id: str
    tenant: str
    task: str
    input: dict[str, Any]
    status: JobStatus = JobStatus.QUEUED
    priority: Priority = Priority.NORMAL
    tier_hint: TierHint = TierHint.AUTO
    local_only: bool = False
    # False: the job (or its tenant) opted out; its input and answer never become a training example.
    learning: bool = True
    # The frontier mode the submitter asked for (None: the tenant's, else the task's); the effective
    # one is `route.frontier_mode`.
    frontier_mode: FrontierMode | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = None
    route: RouteDecision
    attempts: list[Attempt] = Field(default_factory=list)
    result: Any = None
    error: ErrorInfo | None = None
    escalation_reasons: list[str] = Field(default_factory=list)
    # Given once, by the job's tenant (POST /v1/jobs/{id}/feedback).
    feedback: Feedback | None = None
    created_at: float
    updated_at: float
    queued_at: float
    ended_at: float | None = None
    # The job fails with `deadline_exceeded` rather than retry an infrastructure failure past it.
    # None: no deadline (records written before deadlines existed): such failures are final.
    deadline_at: float | None = None
    # A retried job waits until then before its next attempt (its message is published delayed).
    retry_at: float | None = None
    trace_id: str | None = None
    # W3C traceparent of the span that submitted the job: whoever publishes its messages outside a
    # span (the API's publisher thread, the sweeper) continues the job's trace from it. Internal.
    traceparent: str | None = None
    # How long the record (and its bytes against the tenant's quota) is kept after its last write:
    # the tenant's retention, set at submission. None: the deployment's `job_retention_s`.
    retention_s: int | None = None
    # Set by a failure a person can act on (the outcome function decides): the reason code under
    # which the job sits in its tenant's dead letters until it is replayed or expires.
    dead_letter: str | None = None
    # Replays of this job (`POST /v1/jobs/{id}/replay`) and when the last one began: the rules that
    # count earlier attempts (re-asks, backoff) count only those since then; its history stays.
    replays: int = 0
    replayed_at: float | None = None
    # Incremented by every write; the store's compare-and-set checks it.
    version: int = 0

    @property
    def current_tier(self) -> Tier:
        if self.status is JobStatus.ESCALATED:
            return Tier.FRONTIER
        return self.attempts[-1].tier if self.attempts else self.route.tier

    def open_attempt(self) -> Attempt | None:
        if self.attempts and self.attempts[-1].outcome is AttemptOutcome.RUNNING:
            return self.attempts[-1]
        return None

    def attempts_since_replay(self) -> list[Attempt]:
        """The attempts of the current run: all of them, or those begun since the last replay."""
        since = self.replayed_at
        return list(self.attempts) if since is None else [a for a in self.attempts if a.started_at >= since]

    def total_cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts if a.billed)

    def public(self) -> dict[str, Any]:
        """The job resource as the API returns it: internal lease fields and worker host names left
        out, and the text of infrastructure errors (a provider's or a server's own words, which may
        name hosts) replaced by a fixed one per code; the record keeps them, and the logs."""
        data = self.model_dump(mode="json", exclude={"version", "traceparent"})
        for attempt in data["attempts"]:
            attempt.pop("task_id", None)
            attempt.pop("lease_expires_at", None)
            attempt.pop("worker", None)
            attempt["error"] = public_error(attempt.get("error"))
        data["error"] = public_error(data.get("error"))
        data["object"] = "job"
        data["cost_usd"] = round(self.total_cost_usd(), 8)
        return data

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


def new_job_id() -> str:
    # Time-ordered prefix so ids sort roughly by creation; random suffix so they cannot be guessed.
    return f"job_{int(time.time() * 1000):013x}{secrets.token_hex(8)}"


def new_job_ids(count: int) -> list[str]:
    """`count` ids like new_job_id's, from one draw of randomness (each draw is a system call)."""
    prefix = f"job_{int(time.time() * 1000):013x}"
    suffixes = secrets.token_hex(8 * count)
    return [prefix + suffixes[16 * i:16 * (i + 1)] for i in range(count)]


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
    metadata: dict[str, str] = Field(default_factory=dict)
    callback_url: str | None = None
    route: RouteDecision
    attempts: list[Attempt] = Field(default_factory=list)
    result: Any = None
    error: ErrorInfo | None = None
    escalation_reasons: list[str] = Field(default_factory=list)
    created_at: float
    updated_at: float
    queued_at: float
    ended_at: float | None = None
    trace_id: str | None = None
    # W3C traceparent of the span that submitted the job: whoever publishes its messages outside a
    # span (the API's publisher thread, the sweeper) continues the job's trace from it. Internal.
    traceparent: str | None = None
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

    def total_cost_usd(self) -> float:
        return sum(a.cost_usd for a in self.attempts if a.billed)

    def public(self) -> dict[str, Any]:
        """The job resource as the API returns it (internal lease fields left out)."""
        data = self.model_dump(mode="json", exclude={"version", "traceparent"})
        for attempt in data["attempts"]:
            attempt.pop("task_id", None)
            attempt.pop("lease_expires_at", None)
        data["object"] = "job"
        data["cost_usd"] = round(self.total_cost_usd(), 8)
        return data

"""Every Redis key, queue name, task name and span attribute of smallfirst, in one place.

The Helm chart's and the kustomize manifests' KEDA triggers are checked against these constants by
a test, so renaming a queue here without the deployment files fails the build.
"""

from __future__ import annotations

from typing import Final

# ---- Celery queues (one per tier, plus the escalation hop and webhook delivery) ----------------
QUEUE_SMALL: Final = "small"
QUEUE_FRONTIER: Final = "frontier"
QUEUE_ESCALATION: Final = "escalation"
QUEUE_WEBHOOKS: Final = "webhooks"
ALL_QUEUES: Final = (QUEUE_SMALL, QUEUE_FRONTIER, QUEUE_ESCALATION, QUEUE_WEBHOOKS)

# Which queues each worker pool consumes. The frontier pool lists `escalation` first: with kombu's
# "priority" queue order the Redis transport polls priority step by step and, within a step, the
# queues in the order listed, so an escalated job is always taken before a fresh frontier job of
# the same priority (and escalations are published one step higher), never starved by a flood.
POOL_SMALL: Final = "small"
POOL_FRONTIER: Final = "frontier"
POOL_WEBHOOKS: Final = "webhooks"
POOL_QUEUES: Final[dict[str, tuple[str, ...]]] = {
    POOL_SMALL: (QUEUE_SMALL,),
    POOL_FRONTIER: (QUEUE_ESCALATION, QUEUE_FRONTIER, QUEUE_WEBHOOKS),
    POOL_WEBHOOKS: (QUEUE_WEBHOOKS,),
}

# ---- Priorities -------------------------------------------------------------------------------
# kombu's Redis transport keeps one list per priority step; 0 is served first. A step other than 0
# lives in the list named f"{queue}{PRIORITY_SEP}{step}".
PRIORITY_STEPS: Final = (0, 3, 6, 9)
PRIORITY_SEP: Final = "\x06\x16"
PRIORITY_HIGH: Final = 0
PRIORITY_NORMAL: Final = 3
PRIORITY_LOW: Final = 6
PRIORITY_BY_NAME: Final[dict[str, int]] = {"high": PRIORITY_HIGH, "normal": PRIORITY_NORMAL, "low": PRIORITY_LOW}
# Escalations go ahead of the frontier queue's own normal work: the caller already waited once.
PRIORITY_ESCALATION_BOOST: Final = 3


def priority_list_keys(queue: str) -> tuple[str, ...]:
    """The Redis list keys that together hold `queue`'s messages, one per priority step."""
    return tuple(queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS)


# kombu keeps delivered-but-unacknowledged messages here until they are acked or restored.
KOMBU_UNACKED_KEY: Final = "unacked"
KOMBU_UNACKED_INDEX_KEY: Final = "unacked_index"

# ---- Celery task names ------------------------------------------------------------------------
TASK_RUN_SMALL: Final = "smallfirst.run_small"
TASK_RUN_FRONTIER: Final = "smallfirst.run_frontier"
TASK_DELIVER_WEBHOOK: Final = "smallfirst.deliver_webhook"

# ---- Redis keys -------------------------------------------------------------------------------
KEY_PREFIX: Final = "sf:"


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}job:{job_id}"


def tenant_jobs_key(tenant_id: str) -> str:
    """Sorted set of a tenant's job ids, scored by creation time in ms (cursor pagination)."""
    return f"{KEY_PREFIX}tenant:{tenant_id}:jobs"


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel on which a job's terminal transition is announced (long-poll wake-up)."""
    return f"{KEY_PREFIX}events:job:{job_id}"


JOB_EVENTS_PATTERN: Final = f"{KEY_PREFIX}events:job:*"

# Jobs not yet ended, scored by the time by which they must have made progress; the sweeper
# re-publishes those past due so that a message lost by the broker never loses a job.
ACTIVE_JOBS_KEY: Final = f"{KEY_PREFIX}jobs:active"


def idempotency_key(tenant_id: str, key: str) -> str:
    return f"{KEY_PREFIX}idem:{tenant_id}:{key}"


def api_key_key(key_sha256: str) -> str:
    """Maps the SHA-256 of an API key to its tenant id; the key itself is never stored."""
    return f"{KEY_PREFIX}apikey:{key_sha256}"


TENANTS_KEY: Final = f"{KEY_PREFIX}tenants"  # hash: tenant id -> tenant JSON


def quota_key(tenant_id: str, minute: int) -> str:
    return f"{KEY_PREFIX}quota:{tenant_id}:{minute}"


def stats_key(tenant_id: str, task: str) -> str:
    return f"{KEY_PREFIX}stats:{tenant_id}:{task}"


def stats_index_key(tenant_id: str) -> str:
    """Set of task names for which a tenant has stats."""
    return f"{KEY_PREFIX}stats:{tenant_id}:tasks"


def embedding_cache_key(model: str, text_sha256: str) -> str:
    return f"{KEY_PREFIX}emb:{model}:{text_sha256}"


def rate_limit_key(model: str, dimension: str) -> str:
    """Shared limiter state of one frontier model and one dimension (requests, input/output tokens)."""
    return f"{KEY_PREFIX}ratelimit:{model}:{dimension}"


def webhook_delivery_key(job_id: str) -> str:
    return f"{KEY_PREFIX}webhook:{job_id}"


# ---- HTTP headers -----------------------------------------------------------------------------
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
HEADER_RETRY_AFTER: Final = "Retry-After"
HEADER_WEBHOOK_ID: Final = "webhook-id"
HEADER_WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
HEADER_WEBHOOK_SIGNATURE: Final = "webhook-signature"

# ---- Span attributes (OpenTelemetry semantic conventions first, ours under smallfirst.*) --------
ATTR_JOB_ID: Final = "smallfirst.job.id"
ATTR_TENANT: Final = "smallfirst.tenant.id"
ATTR_TASK: Final = "smallfirst.task.name"
ATTR_TIER: Final = "smallfirst.tier"
ATTR_ROUTE_REASON: Final = "smallfirst.route.reason"
ATTR_ATTEMPT: Final = "smallfirst.attempt.number"
ATTR_VERDICT: Final = "smallfirst.validation.passed"
ATTR_VERDICT_REASONS: Final = "smallfirst.validation.reasons"
ATTR_ESCALATION_REASON: Final = "smallfirst.escalation.reason"
ATTR_COST_USD: Final = "smallfirst.cost.usd"
ATTR_GEN_AI_SYSTEM: Final = "gen_ai.system"
ATTR_GEN_AI_OPERATION: Final = "gen_ai.operation.name"
ATTR_GEN_AI_REQUEST_MODEL: Final = "gen_ai.request.model"
ATTR_GEN_AI_RESPONSE_MODEL: Final = "gen_ai.response.model"
ATTR_GEN_AI_INPUT_TOKENS: Final = "gen_ai.usage.input_tokens"
ATTR_GEN_AI_OUTPUT_TOKENS: Final = "gen_ai.usage.output_tokens"
ATTR_GEN_AI_FINISH_REASON: Final = "gen_ai.response.finish_reasons"

# ---- Service names and default ports ----------------------------------------------------------
SERVICE_API: Final = "smallfirst-api"
SERVICE_SMALL_WORKER: Final = "smallfirst-small-worker"
SERVICE_FRONTIER_WORKER: Final = "smallfirst-frontier-worker"
SERVICE_INFERENCE: Final = "smallfirst-inference"
SERVICE_FRONTIER_SIM: Final = "smallfirst-frontier-sim"

DEFAULT_API_PORT: Final = 8000
DEFAULT_INFERENCE_PORT: Final = 50051
DEFAULT_FRONTIER_SIM_PORT: Final = 8090
DEFAULT_METRICS_PORT_SMALL_WORKER: Final = 9101
DEFAULT_METRICS_PORT_FRONTIER_WORKER: Final = 9102
DEFAULT_METRICS_PORT_INFERENCE: Final = 9103

# Terminal jobs whose callback is still to be delivered, scored by when the next try is due.
WEBHOOK_OUTBOX_KEY: Final = f"{KEY_PREFIX}webhooks:outbox"
# Held by the one worker that runs the sweeper at a time.
SWEEPER_LOCK_KEY: Final = f"{KEY_PREFIX}sweeper:lock"

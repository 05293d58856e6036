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


# The dimensions of a frontier model's shared rate limit, each its own rate_limit_key.
RATE_LIMIT_DIMENSIONS: Final = ("requests", "input_tokens", "output_tokens")


def rate_limit_key(model: str, dimension: str) -> str:
    """Shared limiter state of one frontier model and one dimension (requests, input/output tokens)."""
    return f"{KEY_PREFIX}ratelimit:{model}:{dimension}"


def rate_limit_total_key(model: str, dimension: str) -> str:
    """Running total of what `rate_limit_key(model, dimension)` holds, so a check is not a full scan."""
    return f"{KEY_PREFIX}ratelimit:{model}:{dimension}:total"


def webhook_delivery_key(job_id: str) -> str:
    return f"{KEY_PREFIX}webhook:{job_id}"


# ---- HTTP headers -----------------------------------------------------------------------------
HEADER_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
HEADER_RETRY_AFTER: Final = "Retry-After"
HEADER_WEBHOOK_ID: Final = "webhook-id"
HEADER_WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
HEADER_WEBHOOK_SIGNATURE: Final = "webhook-signature"
# Set on every response of the development Messages-API simulator, so nothing mistakes it for the API.
HEADER_FRONTIER_SIMULATOR: Final = "x-smallfirst-simulator"
# Per-request fault injection at the simulator (tests): "429;retry_after_s=0.5", "529", "drop", ...
HEADER_SIM_FAULT: Final = "x-sim-fault"
# W3C trace context, in HTTP requests and in Celery message headers (a traced worker continues it).
HEADER_TRACEPARENT: Final = "traceparent"

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
ATTR_JOB_STATUS: Final = "smallfirst.job.status"
ATTR_JOB_PRIORITY: Final = "smallfirst.job.priority"
ATTR_ATTEMPT_OUTCOME: Final = "smallfirst.attempt.outcome"
ATTR_CONFIDENCE: Final = "smallfirst.answer.confidence"
ATTR_QUEUE_WAIT_S: Final = "smallfirst.queue.wait_s"
ATTR_ESTIMATED_FRONTIER_COST_USD: Final = "smallfirst.cost.estimated_frontier_usd"
ATTR_RATELIMIT_WAIT_S: Final = "smallfirst.frontier.ratelimit_wait_s"
ATTR_PROVIDER_RETRIES: Final = "smallfirst.frontier.retries"
ATTR_ERROR_CODE: Final = "smallfirst.error.code"
# Current GenAI semantic conventions name the provider here; gen_ai.system is its deprecated form.
ATTR_GEN_AI_PROVIDER: Final = "gen_ai.provider.name"
ATTR_GEN_AI_REQUEST_MAX_TOKENS: Final = "gen_ai.request.max_tokens"
ATTR_GEN_AI_RESPONSE_ID: Final = "gen_ai.response.id"
ATTR_GEN_AI_CACHE_READ_TOKENS: Final = "gen_ai.usage.cache_read.input_tokens"
ATTR_GEN_AI_CACHE_CREATION_TOKENS: Final = "gen_ai.usage.cache_creation.input_tokens"
ATTR_ERROR_TYPE: Final = "error.type"
GEN_AI_PROVIDER_ANTHROPIC: Final = "anthropic"
GEN_AI_PROVIDER_SMALLFIRST: Final = "smallfirst"  # the self-hosted inference service (vLLM)
GEN_AI_OPERATION_CHAT: Final = "chat"
GEN_AI_OPERATION_EMBEDDINGS: Final = "embeddings"

# ---- Span names of our own spans (instrumentations name theirs) --------------------------------
SPAN_JOB_SUBMIT: Final = "smallfirst.job.submit"
SPAN_JOB_ATTEMPT: Final = "smallfirst.job.attempt"
SPAN_VALIDATE: Final = "smallfirst.validate"
SPAN_RATELIMIT_WAIT: Final = "smallfirst.frontier.ratelimit_wait"
# One frontier answer: every provider call (the SDK's own client spans), retry and limiter wait inside.
SPAN_FRONTIER_CALL: Final = "smallfirst.frontier.call"

# ---- Log record fields (structured JSON logs) -------------------------------------------------
LOG_FIELD_TRACE_ID: Final = "trace_id"
LOG_FIELD_SPAN_ID: Final = "span_id"
LOG_FIELD_JOB_ID: Final = "job_id"

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

# ---- gRPC between the small workers and the inference service ---------------------------------
INFERENCE_GRPC_SERVICE: Final = "smallfirst.inference.v1.InferenceService"
# Clients ping a connection every GRPC_KEEPALIVE_TIME_MS (also while idle, so a dead peer behind a
# NAT or a killed pod is noticed); the server must accept pings at least that often or it answers
# GOAWAY too_many_pings, hence its minimum interval is below the clients' ping time.
GRPC_KEEPALIVE_TIME_MS: Final = 30_000
GRPC_KEEPALIVE_TIMEOUT_MS: Final = 10_000
GRPC_SERVER_MIN_PING_INTERVAL_MS: Final = 10_000

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
    POOL_FRONTIER: (QUEUE_ESCALATION, QUEUE_FRONTIER),
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
# Shadow samples wait behind every job: they never delay a result.
PRIORITY_SHADOW: Final = 9
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
# Several queued small-tier jobs in one message (a dispatcher's refill under load): one delivery,
# QoS entry and acknowledgement for them all; each job still runs and ends on its own.
TASK_RUN_SMALL_MANY: Final = "smallfirst.run_small_many"
TASK_RUN_FRONTIER: Final = "smallfirst.run_frontier"
TASK_DELIVER_WEBHOOK: Final = "smallfirst.deliver_webhook"
# A shadow sample: the frontier also answers a job the small tier kept (frontier pool, low priority).
TASK_RUN_SHADOW: Final = "smallfirst.run_shadow"

# ---- Redis keys -------------------------------------------------------------------------------
KEY_PREFIX: Final = "sf:"


def job_key(job_id: str) -> str:
    return f"{KEY_PREFIX}job:{job_id}"


def tenant_jobs_key(tenant_id: str) -> str:
    """Sorted set of a tenant's job ids, scored by creation time in ms (cursor pagination)."""
    return f"{KEY_PREFIX}tenant:{tenant_id}:jobs"


# A tenant's job index keeps entries this long past the retention period (a job lives at most its
# deadline, a day by default, before its last write), then they are trimmed on the next submission.
TENANT_JOBS_INDEX_SLACK_S: Final = 2 * 24 * 3600


def tenant_jobs_trim_score(now: float, retention_s: int) -> int:
    """Index entries scored below this (creation in ms) name jobs whose record has expired."""
    return int((now - retention_s - TENANT_JOBS_INDEX_SLACK_S) * 1000)


def job_events_channel(job_id: str) -> str:
    """Pub/sub channel on which a job's terminal transition is announced (long-poll wake-up)."""
    return f"{KEY_PREFIX}events:job:{job_id}"


JOB_EVENTS_PATTERN: Final = f"{KEY_PREFIX}events:job:*"

# Jobs not yet ended, scored by the time by which they must have made progress; the sweeper
# re-publishes those past due so that a message lost by the broker never loses a job.
ACTIVE_JOBS_KEY: Final = f"{KEY_PREFIX}jobs:active"
# New jobs whose first message may not be on its queue yet, scored by when they were stored. Written
# in the same transaction as the job record, removed once the message is published; the sweeper
# re-publishes entries older than a few seconds (a crash between the store and the publish). No TTL:
# every entry is removed by the publisher or by the sweeper, never by time (an expiring entry would
# be exactly the lost job this set exists to prevent).
PUBLISH_OUTBOX_KEY: Final = f"{KEY_PREFIX}jobs:publish-outbox"
# The run id of the Redis server the sweeper last saw: a different one means Redis restarted (from
# its AOF), and every queued message may have been lost with the writes it had not persisted.
# TTL: REDIS_RUN_ID_TTL_S, renewed by every sweep (a stale value only causes one extra full sweep).
REDIS_RUN_ID_KEY: Final = f"{KEY_PREFIX}sweeper:redis-run-id"
REDIS_RUN_ID_TTL_S: Final = 7 * 24 * 3600


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


# Outcome counters bucketed by time (the dashboard's charts): the same fields as `stats_key`
# minus the submission counters, one hash per tenant and bucket, fields "<task>/<field>".
SERIES_MINUTE_S: Final = 60
SERIES_HOUR_S: Final = 3600
# Kept long enough for the dashboard's windows (1 h of minutes, 7 d of hours), then expired.
SERIES_MINUTE_TTL_S: Final = 2 * 24 * 3600
SERIES_HOUR_TTL_S: Final = 35 * 24 * 3600


def stats_series_key(tenant_id: str, bucket_s: int, bucket_start: int) -> str:
    """Hash of a tenant's outcome counters in the bucket of width `bucket_s` starting at `bucket_start` (Unix s)."""
    return f"{KEY_PREFIX}series:{tenant_id}:{bucket_s}:{bucket_start}"


# The dashboard's session-signing secret when the operator sets none: shared by every API process
# through Redis so a session signed by one is honoured by all. No TTL: deleting it is the rotation
# (every session ends).
UI_SESSION_SECRET_KEY: Final = f"{KEY_PREFIX}ui:session-secret"


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


# ---- Frontier batch mode (frontier_worker/batches.py says what each holds and for how long) ----
# Sorted set: custom_id -> when it was buffered; hash: custom_id -> the request's JSON. No TTL:
# accepted work waiting for the next batch; the submitter drains them.
BATCH_BUFFER_KEY: Final = f"{KEY_PREFIX}batch:buffer"
BATCH_BUFFER_REQUESTS_KEY: Final = f"{KEY_PREFIX}batch:buffer:requests"
# Sorted set: intent id -> when it was recorded; intents not yet matched to a provider batch. No
# TTL: each is resolved by the submitter or by reconcile, never by time.
BATCH_INTENTS_KEY: Final = f"{KEY_PREFIX}batch:intents"
# Sorted set: batch id -> when it was recorded; batches whose results are not all handled. No TTL,
# for the same reason.
BATCH_ACTIVE_KEY: Final = f"{KEY_PREFIX}batch:active"
# Set: custom_ids of batched attempts whose jobs were cancelled (written by the API in the cancel's
# transaction); the frontier pool's batch lane takes them out and withdraws each request. No TTL:
# it is emptied by that code, and an entry left behind only costs a withdrawal that finds nothing.
BATCH_CANCEL_REQUESTS_KEY: Final = f"{KEY_PREFIX}batch:cancel-requests"
# Held (with a TTL) by the one process that takes requests from the buffer and creates a batch.
BATCH_SUBMIT_LOCK_KEY: Final = f"{KEY_PREFIX}batch:submit:lock"


# Attempt numbers start at 1: a batched request "number" 0 is the job's shadow sample.
BATCH_SHADOW_ATTEMPT = 0


def batch_custom_id(job_id: str, attempt: int) -> str:
    """The Message Batches `custom_id` of one job attempt (the API allows letters, digits, `_`, `-`);
    attempt `BATCH_SHADOW_ATTEMPT` names the job's shadow sample."""
    return f"{job_id}-{attempt}"


def batch_intent_key(intent_id: str) -> str:
    """Hash: the requests of a batch about to be created, and when; deleted once resolved."""
    return f"{KEY_PREFIX}batch:intent:{intent_id}"


def batch_record_key(batch_id: str) -> str:
    """Hash: a created batch's custom_ids and state (TTL: the provider's results retention)."""
    return f"{KEY_PREFIX}batch:record:{batch_id}"


def batch_handled_key(batch_id: str) -> str:
    """Set: the custom_ids of a batch whose results were handed to the caller (TTL as the record)."""
    return f"{KEY_PREFIX}batch:handled:{batch_id}"


def batch_cancelled_key(batch_id: str) -> str:
    """Set: the custom_ids of a batch whose jobs asked to be cancelled (TTL as the record)."""
    return f"{KEY_PREFIX}batch:cancelled:{batch_id}"


def batch_poll_lock_key(batch_id: str) -> str:
    """Held (with a TTL, renewed per result) by the one poller streaming a batch's results."""
    return f"{KEY_PREFIX}batch:poll:lock:{batch_id}"


def batch_location_key(custom_id: str) -> str:
    """String: the batch id a custom_id was sent in (TTL as the record)."""
    return f"{KEY_PREFIX}batch:where:{custom_id}"


def webhook_host_slots_key(host: str) -> str:
    """The deliveries to `host` in flight (a sorted set of slot tokens scored by expiry; its TTL is
    renewed with each slot taken, so an idle host's key goes away)."""
    return f"{KEY_PREFIX}webhook-host:{host}"


# ---- Dead letters (jobs that failed for a reason a person can act on, and undecodable messages) --
# Per tenant: a sorted set of job ids scored by when the job failed (ms; listing, time ranges,
# cursors) and a hash of job id -> the entry's JSON. Both carry the job retention as their TTL,
# renewed by each new entry: an entry never outlives the job it replays.


def dead_letters_key(tenant_id: str) -> str:
    return f"{KEY_PREFIX}deadletters:{tenant_id}"


def dead_letter_entries_key(tenant_id: str) -> str:
    return f"{KEY_PREFIX}deadletters:{tenant_id}:entries"


# Queue messages no worker could decode belong to no known tenant: the same pair of keys under this
# name (an id no tenant can have: tenant ids never start with an underscore), TTL as above.
UNDECODABLE_MESSAGES_TENANT: Final = "_undecodable"


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
SERVICE_WEBHOOK_WORKER: Final = "smallfirst-webhooks-worker"
SERVICE_INFERENCE: Final = "smallfirst-inference"
SERVICE_FRONTIER_SIM: Final = "smallfirst-frontier-sim"

DEFAULT_API_PORT: Final = 8000
DEFAULT_INFERENCE_PORT: Final = 50051
DEFAULT_FRONTIER_SIM_PORT: Final = 8090
DEFAULT_METRICS_PORT_SMALL_WORKER: Final = 9101
DEFAULT_METRICS_PORT_FRONTIER_WORKER: Final = 9102
DEFAULT_METRICS_PORT_INFERENCE: Final = 9103
DEFAULT_METRICS_PORT_WEBHOOK_WORKER: Final = 9104

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

# ---- Learning: example memory and trained heads (smallfirst.common.examples) -------------------
# Keys are per task and per embedding model: a vector means nothing under another model.
# The example memory's keys expire after the task's retention (renewed by every write), so the
# memory of a task nobody uses any more goes away by itself.


def examples_key(task: str, model: str) -> str:
    """Hash: example id (the job id) -> the example's JSON (text, label, source, tenant, ...)."""
    return f"{KEY_PREFIX}examples:{task}:{model}"


def examples_vectors_key(task: str, model: str) -> str:
    """Hash: example id -> its input's embedding (float32 bytes), filled by the small tier."""
    return f"{KEY_PREFIX}examples:{task}:{model}:vectors"


def examples_by_time_key(task: str, model: str) -> str:
    """Sorted set: example id -> when it was recorded (retention is enforced from its low end)."""
    return f"{KEY_PREFIX}examples:{task}:{model}:time"


def examples_by_label_key(task: str, model: str, label: str) -> str:
    """Sorted set: the ids of one label's examples by time (the cap per label drops its oldest)."""
    return f"{KEY_PREFIX}examples:{task}:{model}:label:{label}"


def examples_added_key(task: str, model: str) -> str:
    """Counter of examples recorded (the trainer retrains every `retrain_every` of them)."""
    return f"{KEY_PREFIX}examples:{task}:{model}:added"


def tenant_examples_key(tenant_id: str) -> str:
    """Set of "task|model|id" of a tenant's examples, so deleting a tenant's data finds them."""
    return f"{KEY_PREFIX}tenant:{tenant_id}:examples"


def head_key(task: str, model: str) -> str:
    """Hash: the live trained head of a task (`meta` JSON, `weights` npz bytes). No TTL: it is the
    task's current model, replaced by the next training that beats it, never by time."""
    return f"{KEY_PREFIX}head:{task}:{model}"


def head_version_key(task: str, model: str) -> str:
    """The live head's version number; small workers poll it (one GET) to pick up a new head. No TTL,
    as the head it names."""
    return f"{KEY_PREFIX}head:{task}:{model}:version"


def head_trained_key(task: str, model: str) -> str:
    """The value of examples_added_key at the last training, tried or published (no TTL: as the head)."""
    return f"{KEY_PREFIX}head:{task}:{model}:trained-at-count"


def train_lock_key(task: str, model: str) -> str:
    """Held (with a TTL) by the one trainer training a task's head."""
    return f"{KEY_PREFIX}head:{task}:{model}:lock"


def input_vector_key(model: str, text_sha256: str) -> str:
    """The embedding the small tier computed for a job's input, kept briefly (INPUT_VECTOR_TTL_S) so
    that the trainer need not embed an escalated job's input again."""
    return f"{KEY_PREFIX}invec:{model}:{text_sha256}"


INPUT_VECTOR_TTL_S: Final = 6 * 3600


def recent_inputs_key(task: str, model: str) -> str:
    """List: the vectors of the task's latest inputs that may teach it (capped at RECENT_INPUTS_KEPT,
    TTL as the input vectors), on which the trainer estimates a new head's frontier share and which
    the live head's sure answers label for the next head."""
    return f"{KEY_PREFIX}head:{task}:{model}:recent-inputs"


# 6,000 vectors of 384 floats are 9 MB a task: the trainer labels three times as many inputs with
# the live head's sure answers than with 2,000, and estimates the frontier share on more of them.
RECENT_INPUTS_KEPT: Final = 6000


def head_next_version_key(task: str, model: str) -> str:
    """Counter handing out head version numbers, tried or published (no TTL: versions never repeat)."""
    return f"{KEY_PREFIX}head:{task}:{model}:next-version"


def shadow_done_key(job_id: str) -> str:
    """Set once a job's shadow sample ran (TTL SHADOW_DONE_TTL_S), so a redelivery bills it once."""
    return f"{KEY_PREFIX}shadow:{job_id}"


SHADOW_DONE_TTL_S: Final = 24 * 3600


def head_published_key(task: str, model: str) -> str:
    """Counter of heads that went live (no TTL: as the head)."""
    return f"{KEY_PREFIX}head:{task}:{model}:published"

# ---- Tenancy: spend budgets, quotas (budgets.py and quotas.py say what each holds) -------------
def spend_key(tenant_id: str, period: str, period_id: str) -> str:
    """Float: a tenant's frontier spend in USD in one UTC day or month (TTL: the period plus slack)."""
    return f"{KEY_PREFIX}spend:{tenant_id}:{period}:{period_id}"


def budget_warned_key(tenant_id: str, period: str, period_id: str) -> str:
    """Set once when a tenant passes 80 % of a budget in a period (TTL as the spend counter)."""
    return f"{KEY_PREFIX}spend:{tenant_id}:{period}:{period_id}:warned"


def usage_key(tenant_id: str) -> str:
    """Hash: a tenant's jobs_in_flight and bytes_stored. No TTL: it counts what the tenant holds now
    (moved with every write it counts, released as records expire, see quotas.py); it is as
    long-lived as the tenant."""
    return f"{KEY_PREFIX}usage:{tenant_id}"


def usage_bytes_key(tenant_id: str) -> str:
    """Hash: record (job id or idem:<key>) -> bytes counted for it. No TTL: each field is removed
    when its record's expiry passes (quotas.py); the hash lives as long as the tenant has records."""
    return f"{KEY_PREFIX}usage:{tenant_id}:bytes"


def usage_expiry_key(tenant_id: str) -> str:
    """Sorted set: counted record -> when its TTL ends. No TTL, for the reason of usage_bytes_key."""
    return f"{KEY_PREFIX}usage:{tenant_id}:expiry"


def submission_bucket_key(tenant_id: str) -> str:
    """Hash: a tenant's submission token bucket (tokens, ts); TTL: the time to refill it."""
    return f"{KEY_PREFIX}bucket:{tenant_id}"


# ---- Fair scheduling across tenants (fair.py says what each holds) -----------------------------
# The Celery queues whose first deliveries wait in per-tenant lists and are fed to the queue by one
# dispatcher per queue (elected deployment-wide), by weighted deficit round robin over tenants.
FAIR_QUEUES: Final = (QUEUE_SMALL, QUEUE_FRONTIER)
# The priority steps fair lists exist for (high, normal, low), served strictly in this order; the
# shadow step (PRIORITY_SHADOW) is never fair-queued.
FAIR_STEPS: Final = (PRIORITY_HIGH, PRIORITY_NORMAL, PRIORITY_LOW)
# Sorted set: job id -> when a dispatcher took it from a fair list, until its Celery message is sent.
# No TTL, as the publish outbox: the sweeper publishes an entry left by a dispatcher that died.
FAIR_DISPATCHING_KEY: Final = f"{KEY_PREFIX}fair:dispatching"
# How long the deficit counters and the wake-up list live unrenewed (each refill renews them).
FAIR_STATE_TTL_S: Final = 24 * 3600
FAIR_WAKE_TTL_S: Final = 60


def fair_base_key(queue: str) -> str:
    """The prefix of a fair queue's keys (the Lua scripts build the per-step keys from it)."""
    return f"{KEY_PREFIX}fair:{queue}:"


def fair_tenant_list_key(queue: str, step: int, tenant_id: str) -> str:
    """List: a tenant's waiting entries ("<job id> <traceparent>") for one queue and priority step.
    No TTL: its entries are the work itself (as a Celery queue's)."""
    return f"{fair_base_key(queue)}{step}:t:{tenant_id}"


def fair_ring_key(queue: str, step: int) -> str:
    """List: the tenants with waiting entries at that step, in round-robin order (a tenant is in it
    exactly while its list is not empty). No TTL, as the lists it indexes."""
    return f"{fair_base_key(queue)}{step}:ring"


def fair_deficit_key(queue: str, step: int) -> str:
    """Hash: tenant -> what is left of its current turn's quantum (DRR deficit); TTL FAIR_STATE_TTL_S."""
    return f"{fair_base_key(queue)}{step}:deficit"


def fair_backlog_key(queue: str) -> str:
    """List of one placeholder per entry waiting in the queue's fair lists (all steps), so that LLEN
    gives the backlog to the queue-length gauge and to KEDA's redis trigger. No TTL: as the lists."""
    return f"{fair_base_key(queue)}backlog"


def queue_backlog_keys(queue: str) -> tuple[str, ...]:
    """Every Redis list whose LLEN is work waiting for `queue`: its priority lists, then, for a fair
    queue, its fair backlog (the queue-length gauge, the dashboard and the KEDA triggers add them)."""
    return priority_list_keys(queue) + ((fair_backlog_key(queue),) if queue in FAIR_QUEUES else ())


def fair_wake_key(queue: str) -> str:
    """List of at most one element: pushed with every enqueue, the dispatcher blocks on it (BLPOP)."""
    return f"{fair_base_key(queue)}wake"


def fair_lock_key(queue: str) -> str:
    """Held (with a TTL, renewed) by the one dispatcher of a queue in the deployment."""
    return f"{fair_base_key(queue)}lock"


# ---- Keys without a TTL -----------------------------------------------------------------------
# Every other key the project (or Celery/kombu on its behalf) writes expires. Glob patterns (as
# Redis SCAN MATCH and fnmatch read them) -> why the key may live without one; a test scans Redis
# after jobs ran through the API and the workers and fails on any other key without a TTL.
KEYS_WITHOUT_TTL: Final[dict[str, str]] = {
    TENANTS_KEY: "the tenants: each lives until an operator deletes it",
    f"{KEY_PREFIX}apikey:*": "an API key's hash: valid until it is revoked (revoking deletes it)",
    f"{KEY_PREFIX}stats:*": "a tenant's lifetime counters for /v1/stats, one hash per task (bounded by the catalog)",
    ACTIVE_JOBS_KEY: "the jobs not yet ended: each member is removed when its job ends",
    WEBHOOK_OUTBOX_KEY: "callbacks still to deliver: each member is removed when delivered or given up",
    f"{KEY_PREFIX}usage:*": "a tenant's quota counters and the expiry index that releases them (quotas.py)",
    BATCH_BUFFER_KEY: "accepted work waiting for the next provider batch",
    BATCH_BUFFER_REQUESTS_KEY: "accepted work waiting for the next provider batch",
    BATCH_INTENTS_KEY: "batch intents, each resolved by the submitter or by reconcile",
    BATCH_ACTIVE_KEY: "provider batches whose results are not all handled",
    f"{KEY_PREFIX}head:*:*:published": "a task's count of published heads: as long-lived as its head",
    f"{KEY_PREFIX}head:*:*:next-version": "hands out head versions: versions never repeat",
    f"{KEY_PREFIX}head:*:*:trained-at-count": "the example count at a task's last training: as its head",
    f"{KEY_PREFIX}head:*:*:version": "the live head's version the small workers poll: as the head",
    f"{KEY_PREFIX}head:*": "a task's live trained head: replaced by a better one, never by time",
    **{queue: "a Celery queue: its messages are the work itself" for queue in ALL_QUEUES},
    **{f"{queue}{PRIORITY_SEP}*": "a Celery queue's priority step: its messages are the work itself"
       for queue in ALL_QUEUES},
    KOMBU_UNACKED_KEY: "kombu's delivered-but-unacknowledged messages, restored or acked",
    KOMBU_UNACKED_INDEX_KEY: "kombu's index of the unacknowledged messages",
    "_kombu.binding*": "kombu's exchange-to-queue bindings (and their deadlines), as long as the queues",
    FAIR_DISPATCHING_KEY: "jobs taken from a fair list whose message is being sent: removed once sent or swept",
    **{f"{KEY_PREFIX}fair:{queue}:*:t:*": "a tenant's fair list: its entries are the work itself"
       for queue in FAIR_QUEUES},
    **{f"{KEY_PREFIX}fair:{queue}:*:ring": "the tenants with waiting fair entries: each leaves when its list empties"
       for queue in FAIR_QUEUES},
    **{f"{KEY_PREFIX}fair:{queue}:backlog": "one placeholder per waiting fair entry: as long-lived as the entries"
       for queue in FAIR_QUEUES},
}

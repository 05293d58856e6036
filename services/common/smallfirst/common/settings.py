"""Settings shared by every service that talks to Redis and the queues.

Each service defines its own settings class on top of `CoreSettings` (one class per service).
Values come from the environment with the `SMALLFIRST_` prefix; `REDIS_URL` is accepted as well.
Required values have no default: a service refuses to start without them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMALLFIRST_", extra="ignore", frozen=True)

    redis_url: str = Field(validation_alias=AliasChoices("SMALLFIRST_REDIS_URL", "REDIS_URL"))
    catalog_path: Path
    # How long a job record (and its place in the tenant's listing) is kept after its last change.
    job_retention_s: int = Field(default=7 * 24 * 3600, gt=0)

    # ---- Celery reliability on a Redis broker (queues.py says which settings and why) ---------
    # Must exceed the longest job, including every retry and backoff, or a job still running would
    # be delivered a second time.
    broker_visibility_timeout_s: int = Field(default=3 * 3600, gt=0)
    # A job's lease: a redelivered message (or the sweeper) may take over a running attempt only
    # once it expired. The worker renews it every third of this while the attempt runs, so it
    # bounds how long a dead worker's job waits, not how long an attempt may take. Kept below the
    # visibility timeout so that a redelivery after a crash always finds it expired.
    job_lease_s: int = Field(default=120, gt=0)
    # Hard time limit of one task.
    task_time_limit_s: int = Field(default=30 * 60, gt=0)
    # Warm shutdown waits this long for running tasks before it gives them back to the queue.
    worker_soft_shutdown_timeout_s: float = Field(default=60.0, ge=0)
    # A worker whose consumer cannot recover (an unrecoverable error in Celery's consumer) lets its
    # running tasks finish for at most this long, then exits non-zero for its supervisor to restart it.
    worker_exit_grace_s: float = Field(default=30.0, ge=0)
    # Liveness: a worker with free threads that received no message for this long while its queues
    # hold messages is not consuming (a consumer that reconnected but no longer polls): it stops
    # beating, and the liveness probe fails once the heartbeat is older than the probe's limit.
    worker_stall_s: float = Field(default=60.0, gt=0)
    # The sweeper re-publishes a job that made no progress for this long (lost broker message).
    sweep_stale_after_s: int = Field(default=15 * 60, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)
    # A new job whose first message the API has not confirmed this long after storing it is
    # published by the sweeper (the API normally confirms within milliseconds).
    sweep_outbox_grace_s: float = Field(default=10.0, gt=0)

    # ---- Fair scheduling across tenants (fair.py) ---------------------------------------------
    # On: queued jobs wait in per-tenant lists, fed to the tier queues by weighted round robin.
    # Off: published straight to the Celery queues (the dispatchers still drain the fair lists).
    fair_scheduling: bool = True
    # Messages the dispatcher keeps waiting in each tier queue (beside the workers' prefetch, one
    # per thread): enough to cover its reaction time, few enough that a late tenant waits little.
    fair_queue_depth: int = Field(default=4, gt=0)
    # Jobs a small-queue message may carry when a refill takes several at once (1: one per message).
    # A message costs the worker its delivery, its QoS bookkeeping and its acknowledgement (kombu's
    # round trips and the consumer thread's time under the interpreter lock), whatever it carries:
    # on two cores that was about as much CPU as the rest of a classify job. The frontier queue keeps
    # one job per message: each holds a long API call and its own retries.
    small_jobs_per_message: int = Field(default=8, gt=0)
    # How often the dispatcher looks at a full tier queue while a backlog waits (an enqueue wakes it
    # at once, BLPOP), and how long a dispatcher's election lock lives unrenewed.
    fair_poll_s: float = Field(default=0.01, gt=0)
    fair_lock_ttl_s: float = Field(default=5.0, gt=0)

    # Operator switch: callbacks to loopback and private networks (refused by default, see webhooks.py).
    allow_private_callbacks: bool = False
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, gt=0)

    log_json: bool = True
    log_level: str = "INFO"
    # Celery's own INFO line as each task is received and as it ends (a worker's job transitions
    # are in the job's events and metrics either way).
    log_task_lines: bool = False

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

    # ---- Celery reliability (see shared/REFERENCE.md, "Celery with a Redis broker") ----------
    # Must exceed the longest job, including every retry and backoff, or a job still running would
    # be delivered a second time.
    broker_visibility_timeout_s: int = Field(default=3 * 3600, gt=0)
    # A job's lease: a redelivered message may take over a running attempt only once it expired.
    # Kept below the visibility timeout so that a redelivery after a crash always finds it expired.
    job_lease_s: int = Field(default=2 * 3600, gt=0)
    # Hard time limit of one task; the lease outlives it.
    task_time_limit_s: int = Field(default=30 * 60, gt=0)
    # Warm shutdown waits this long for running tasks before it gives them back to the queue.
    worker_soft_shutdown_timeout_s: float = Field(default=60.0, ge=0)
    # The sweeper re-publishes a job that made no progress for this long (lost broker message).
    sweep_stale_after_s: int = Field(default=15 * 60, gt=0)
    sweep_interval_s: float = Field(default=30.0, gt=0)

    # Operator switch: callbacks to loopback and private networks (refused by default, see webhooks.py).
    allow_private_callbacks: bool = False
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, gt=0)

    log_json: bool = True
    log_level: str = "INFO"

"""Settings of the ingest API (environment, prefix SMALLFIRST_)."""

from __future__ import annotations

from pydantic import Field

from smallfirst.common import constants as k
from smallfirst.common.settings import CoreSettings

MIB = 1024 * 1024


class ApiSettings(CoreSettings):
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=k.DEFAULT_API_PORT, ge=0, le=65535)
    api_workers: int = Field(default=1, ge=1)
    access_log: bool = False
    # Longer than the idle timeout of the load balancers in front (often 60 s), so the server never
    # closes a kept-alive connection that a proxy is about to reuse.
    keep_alive_s: int = Field(default=75, gt=0)
    # On SIGTERM, requests in progress (long-polls) get this long to finish before they are cut.
    shutdown_grace_s: float = Field(default=15.0, ge=0)

    # ---- limits ---------------------------------------------------------------------------------
    max_body_bytes: int = Field(default=1 * MIB, gt=0)
    max_batch_body_bytes: int = Field(default=4 * MIB, gt=0)
    max_batch_jobs: int = Field(default=1000, gt=0)
    list_default_limit: int = Field(default=20, gt=0)
    list_max_limit: int = Field(default=100, gt=0)
    # A listing with filters reads at most this many index entries per page; a sparse filter then
    # returns a short page with a cursor rather than scanning a tenant's whole history at once.
    list_max_scan: int = Field(default=5000, gt=0)
    long_poll_max_wait_s: float = Field(default=60.0, gt=0, le=60.0)

    # ---- tenants, quotas, idempotency --------------------------------------------------------
    # Jobs per minute for tenants without a quota of their own; None: unlimited.
    default_quota_jobs_per_minute: int | None = Field(default=None, gt=0)
    # How long a tenant looked up by key is remembered in-process (a revoked key works this long).
    tenant_cache_ttl_s: float = Field(default=5.0, ge=0)
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    # A request that holds a key dies with its process; the key is free again after this long.
    idempotency_in_flight_ttl_s: int = Field(default=60, gt=0)

    # Callbacks: `allow_private_callbacks` comes from CoreSettings, shared with the delivering workers.

    # ---- storing and publishing ----------------------------------------------------------------
    # Submissions arriving together are stored in one transaction of at most this many jobs
    # (a single request larger than that still goes whole).
    commit_group_max_jobs: int = Field(default=1000, gt=0)
    # Concurrent submissions are published together, in one pipelined round trip of at most this many.
    publish_batch_max: int = Field(default=500, gt=0)

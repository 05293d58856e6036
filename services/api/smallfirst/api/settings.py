"""Settings of the ingest API (environment, prefix SMALLFIRST_)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from smallfirst.common import constants as k
from smallfirst.common.jobs import Priority
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
    # The request line and all headers together (431 beyond it, see api/server.py).
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    # Long-polls (GET /v1/jobs/{id}?wait=) one tenant may hold open at once in one API process;
    # each holds a connection and a subscription slot for up to a minute.
    long_poll_max_per_tenant: int = Field(default=100, gt=0)
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
    # Defaults for every tenant without a value of its own (tenants.py; quotas.py says how they
    # are counted). None: no limit.
    default_max_jobs_in_flight: int | None = Field(default=50_000, gt=0)
    default_max_bytes_stored: int | None = Field(default=256 * MIB, gt=0)
    default_submissions_per_s: float | None = Field(default=200.0, gt=0)
    default_submissions_burst: int | None = Field(default=2000, gt=0)
    default_max_input_bytes: int = Field(default=256 * 1024, gt=0)
    # Memory guard: above this share of Redis's maxmemory, new work is refused (503
    # redis_memory_high) so that running jobs can always finish; INFO is read at most this often.
    redis_memory_high_water: float = Field(default=0.85, gt=0, le=1)
    redis_memory_check_interval_s: float = Field(default=1.0, gt=0)
    # How long a tenant looked up by key is remembered in-process (a revoked key works this long).
    tenant_cache_ttl_s: float = Field(default=5.0, ge=0)
    idempotency_ttl_s: int = Field(default=24 * 3600, gt=0)
    # A request that holds a key dies with its process; the key is free again after this long.
    idempotency_in_flight_ttl_s: int = Field(default=60, gt=0)

    # Callbacks: `allow_private_callbacks` comes from CoreSettings, shared with the delivering workers.
    # A callback host is resolved (DNS) after auth and quota, on a pool of its own (api/callbacks.py).
    callback_dns_timeout_s: float = Field(default=2.0, gt=0)
    callback_dns_max_concurrency: int = Field(default=8, gt=0)
    callback_dns_max_pending: int = Field(default=64, gt=0)

    # ---- deadlines ---------------------------------------------------------------------------
    # A job without `deadline_s` must end within this long of its submission, by priority:
    # infrastructure failures are retried until then (an interactive job should fail fast, a
    # backfill may wait out a provider outage).
    deadline_s_high: float = Field(default=300.0, gt=0)
    deadline_s_normal: float = Field(default=3600.0, gt=0)
    deadline_s_low: float = Field(default=24 * 3600.0, gt=0)

    def default_deadline_s(self, priority: Priority) -> float:
        return {Priority.HIGH: self.deadline_s_high, Priority.NORMAL: self.deadline_s_normal,
                Priority.LOW: self.deadline_s_low}[priority]

    # ---- storing and publishing ----------------------------------------------------------------
    # Submissions arriving together are stored in one transaction of at most this many jobs
    # (a single request larger than that still goes whole).
    commit_group_max_jobs: int = Field(default=1000, gt=0)
    # Concurrent submissions are published together, in one pipelined round trip of at most this many.
    publish_batch_max: int = Field(default=500, gt=0)

    # ---- dashboard (/ui) -----------------------------------------------------------------------
    # Logging in with this key shows every tenant's jobs; without it only tenants can log in.
    operator_key: SecretStr | None = Field(default=None, min_length=16)
    # Signs the dashboard's session cookies. Unset: a random secret kept in Redis, shared by every
    # API process (ui.session). Set it to end every session on a key change you control.
    ui_session_secret: SecretStr | None = Field(default=None, min_length=16)
    ui_session_ttl_s: int = Field(default=8 * 3600, gt=0)
    # None: Secure cookies when the request came over https (also behind a proxy that says so).
    ui_cookie_secure: bool | None = None
    # How often open pages fetch their live parts again (overview, a running job).
    ui_refresh_s: float = Field(default=5.0, gt=0)

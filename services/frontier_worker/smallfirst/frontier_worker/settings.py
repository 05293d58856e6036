"""Settings of the frontier worker pool (env prefix SMALLFIRST_)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr

from smallfirst.common.constants import DEFAULT_FRONTIER_SIM_PORT, DEFAULT_METRICS_PORT_FRONTIER_WORKER
from smallfirst.common.settings import CoreSettings
from smallfirst.frontier_worker.ratelimit import RateLimit

SIMULATOR_API_KEY = "sk-smallfirst-simulator"


@dataclass(frozen=True)
class FrontierEndpoint:
    base_url: str | None  # None: the SDK's default, the real API
    api_key: str
    # True when calls go to the development simulator because no API key is configured.
    simulated: bool


class FrontierWorkerSettings(CoreSettings):
    # Without a key the pool talks to the development simulator at `frontier_sim_url`.
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SMALLFIRST_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY"))
    # Another Messages-API endpoint (a gateway, or the simulator with a key); None: Anthropic's.
    frontier_base_url: str | None = None
    frontier_sim_url: str = f"http://127.0.0.1:{DEFAULT_FRONTIER_SIM_PORT}"

    # Threads per worker process: jobs in flight at once (each mostly waits on the provider).
    concurrency: int = Field(default=16, gt=0)
    # Prometheus metrics of this process (job transitions, provider calls, tokens, cost); 0: none.
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT_FRONTIER_WORKER, ge=0, le=65535)

    # ---- Retries (the SDK's own are off, so each retry is counted once) -----------------------
    # Provider calls per job attempt, the first included.
    # How often the worker reads whether the jobs whose frontier call is in flight were cancelled
    # (one pipelined read for all of them); a cancel cuts the call within about this long.
    frontier_cancel_poll_s: float = Field(default=0.5, gt=0)
    frontier_max_attempts: int = Field(default=6, ge=1, le=50)
    # The most a job may spend sleeping between retries before it fails with frontier_unavailable.
    frontier_retry_max_wait_s: float = Field(default=120.0, ge=0)
    frontier_backoff_base_ms: int = Field(default=500, gt=0)
    frontier_backoff_max_ms: int = Field(default=30_000, gt=0)

    # ---- Shared rate limits, per model (JSON in the environment) -------------------------------
    # e.g. SMALLFIRST_FRONTIER_RATE_LIMITS='{"claude-haiku-5-5": {"requests_per_min": 4000,
    #      "input_tokens_per_min": 400000, "output_tokens_per_min": 80000}}'
    frontier_rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    # For models without an entry of their own; None: those are not limited.
    frontier_default_rate_limit: RateLimit | None = None
    # Longest a call waits for the limiter before the job gives up (frontier_unavailable).
    frontier_limiter_max_wait_s: float = Field(default=60.0, ge=0)

    # Models known to lack native structured outputs (auto mode uses a forced tool for them; it also
    # learns this from the API's refusal).
    frontier_tool_only_models: tuple[str, ...] = ()

    # ---- Batch mode (Message Batches API; frontier_worker/batches.py) ---------------------------
    # A batch is sent when this many requests are buffered, or the oldest has waited this long.
    frontier_batch_max_requests: int = Field(default=10_000, ge=1, le=100_000)
    frontier_batch_max_age_s: float = Field(default=60.0, ge=0)
    frontier_batch_create_timeout_s: float = Field(default=120.0, gt=0)
    # Must exceed the create timeout: while it is held no reconcile runs.
    frontier_batch_lock_ttl_s: float = Field(default=180.0, gt=0)
    frontier_batch_poll_lock_ttl_s: float = Field(default=120.0, gt=0)
    frontier_batch_clock_skew_s: float = Field(default=300.0, ge=0)
    # How long a batch's record and handled set are kept (the provider keeps results 29 days).
    frontier_batch_record_ttl_s: int = Field(default=30 * 24 * 3600, gt=0)
    # The lease of a batched attempt: longer than the provider's batch window (24 h), so that no
    # sweeper takes over a job whose request waits in a batch.
    frontier_batch_lease_s: float = Field(default=25 * 3600.0, gt=0)
    # How often the pool's batch lane sends due batches, withdraws cancelled requests, reconciles
    # after a crash and polls the batches in flight.
    frontier_batch_poll_interval_s: float = Field(default=5.0, gt=0)
    # Batched tries of a job that may fail (errored, expired) before its retries run in real time.
    frontier_batch_max_tries: int = Field(default=2, ge=1)
    # A batch-mode job with less time than this left before its deadline runs in real time.
    frontier_batch_min_time_left_s: float = Field(default=600.0, ge=0)
    # Fault injection for crash tests: the process SIGKILLs itself the `kill_after`-th time the
    # batch lane reaches this point (after_intent, after_create, after_handle, after_mark). Never set
    # it in production.
    frontier_batch_kill_at: str | None = None
    frontier_batch_kill_after: int = Field(default=1, ge=1)

    # Price table (USD per million tokens); None: the one embedded in smallfirst.common.
    prices_path: Path | None = None

    def endpoint(self) -> FrontierEndpoint:
        if self.anthropic_api_key is None or not self.anthropic_api_key.get_secret_value():
            return FrontierEndpoint(self.frontier_base_url or self.frontier_sim_url, SIMULATOR_API_KEY,
                                    simulated=True)
        return FrontierEndpoint(self.frontier_base_url, self.anthropic_api_key.get_secret_value(),
                                simulated=False)

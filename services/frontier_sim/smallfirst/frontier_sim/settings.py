"""Settings of the Messages-API simulator (env prefix SMALLFIRST_FRONTIER_SIM_)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smallfirst.common.constants import DEFAULT_FRONTIER_SIM_PORT
from smallfirst.frontier_sim.faults import FaultKind


class AnswerStrategy(StrEnum):
    ECHO = "echo"  # text requests get the last user message back; schema requests a synthesized answer
    FIXED = "fixed"  # always `fixed_answer`
    SCRIPTED = "scripted"  # answers from `script_path`: regex rules on the prompt, then a sequence
    ORACLE = "oracle"  # the label of the input text, looked up in `labels_path` (benchmarks)


class FrontierSimSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMALLFIRST_FRONTIER_SIM_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_FRONTIER_SIM_PORT, ge=0, le=65535)
    # Empty: any non-empty key is accepted (the SDK insists on sending one).
    api_key: str = ""

    strategy: AnswerStrategy = AnswerStrategy.ECHO
    fixed_answer: str | None = None
    script_path: Path | None = None
    # CSV with a header naming a `text` column and a `label` (or `category`) column.
    labels_path: Path | None = None

    # Models the simulator serves; empty: the models of the embedded price table.
    models: tuple[str, ...] = ()
    # Models that refuse native structured outputs (400), to exercise the forced-tool fallback.
    models_without_native_structured_output: tuple[str, ...] = ()

    # Every answer takes this long, plus this much per output token (benchmark realism).
    latency_ms: int = Field(default=0, ge=0)
    latency_per_output_token_ms: float = Field(default=0.0, ge=0)

    # Random faults: kind ("429", "529", "500", "400", "401", "slow", "drop") -> probability per request.
    fault_rates: dict[str, float] = Field(default_factory=dict)
    fault_seed: int | None = None
    fault_retry_after_s: float = Field(default=1.0, ge=0)
    fault_slow_ms: int = Field(default=2000, ge=0)

    # ---- Message Batches (kept in the process's memory) ----------------------------------------
    # A batch is in_progress this long after its creation, then ended (the real API: minutes to hours).
    batch_processing_s: float = Field(default=5.0, ge=0)
    # A cancelled batch is canceling this long, then ended with its requests canceled.
    batch_cancel_s: float = Field(default=0.5, ge=0)
    # A batch still processing this long after creation ends with its requests expired (the API: 24 h).
    batch_expiry_s: float = Field(default=86_400.0, gt=0)
    # Shares of batch requests answered errored (api_error) or expired, drawn per custom_id from
    # batch_outcome_seed, so a custom_id has the same outcome in every run.
    batch_errored_rate: float = Field(default=0.0, ge=0, le=1)
    batch_expired_rate: float = Field(default=0.0, ge=0, le=1)
    batch_outcome_seed: int = 0

    # How many request records GET /_sim/stats keeps (oldest dropped first).
    request_log_size: int = Field(default=100_000, gt=0)

    log_level: str = "info"

    @model_validator(mode="after")
    def _strategy_inputs(self) -> FrontierSimSettings:
        if self.strategy is AnswerStrategy.FIXED and self.fixed_answer is None:
            raise ValueError("strategy 'fixed' needs fixed_answer")
        if self.strategy is AnswerStrategy.SCRIPTED and self.script_path is None:
            raise ValueError("strategy 'scripted' needs script_path")
        if self.strategy is AnswerStrategy.ORACLE and self.labels_path is None:
            raise ValueError("strategy 'oracle' needs labels_path")
        for kind, rate in self.fault_rates.items():
            FaultKind.parse(kind)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate of {kind!r} must lie in [0, 1], got {rate}")
        if sum(self.fault_rates.values()) > 1.0:
            raise ValueError("fault rates add up to more than 1")
        if self.batch_errored_rate + self.batch_expired_rate > 1.0:
            raise ValueError("batch_errored_rate and batch_expired_rate add up to more than 1")
        return self

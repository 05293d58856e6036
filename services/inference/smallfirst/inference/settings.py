"""Settings of one inference server process (one model per process)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from smallfirst.common import constants


class InferenceSettings(BaseSettings):
    # protected_namespaces=(): the field names model_path / served_model_name are deliberate.
    model_config = SettingsConfigDict(
        env_prefix="SMALLFIRST_INFERENCE_", extra="ignore", frozen=True, protected_namespaces=()
    )

    # A local model folder (config, tokenizer, weights unless load_format is "dummy") or a Hugging
    # Face model id, as vLLM accepts it.
    model_path: str
    # The name clients ask for; without it, the folder's name.
    served_model_name: str | None = None
    # "generate" serves Generate/GenerateStream, "pooling" serves Embed; "auto" lets vLLM decide
    # from the model's architecture (BertModel: pooling, LlamaForCausalLM: generate).
    runner: Literal["auto", "generate", "pooling"] = "auto"
    # "auto": bfloat16 on GPUs and on CPUs that compute in it (AVX512-BF16, AMX, Arm BF16), float32
    # on other CPUs, where bfloat16 is emulated and several times slower (dtypes.py). float16, the
    # dtype many configs name, is emulated on every CPU. Any other value goes to vLLM as it is.
    dtype: str = "auto"
    # The context in tokens (prompt plus completion); without it, the model's own.
    max_model_len: int | None = Field(default=None, gt=0)
    # "dummy" fills the weights with random values (the tiny development model, GPU benchmarks).
    load_format: str = "auto"
    # Explicit KV-cache size; without it vLLM sizes the cache itself (gpu_memory_utilization on GPU).
    kv_cache_space_gib: float | None = Field(default=None, gt=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    # Sequences and tokens vLLM schedules per step; without them, vLLM's defaults for an engine
    # (on CPU 128 and 2048, half of what its offline LLM class uses).
    max_num_seqs: int | None = Field(default=None, gt=0)
    max_num_batched_tokens: int | None = Field(default=None, gt=0)
    # vLLM's own Prometheus metrics (vllm:*: KV-cache use, time to first token, ...), served next
    # to ours. Off by default: vLLM updates them for every request at every engine step in the
    # front end's one Python thread, which measured 0.28 ms of CPU per short call (a fifth of
    # the front end's work) with the tiny generator (bench/small_tier.py); the front end's CPU is
    # what limits a small model's throughput. Ours (calls, tokens, engine backlog) stay on.
    engine_metrics: bool = False
    # Seconds vLLM's engine processes spin after each message of their step queues before they
    # block (engine_processes.py). vLLM spins for 1 s, which on a machine shared with the
    # callers takes their CPU under any steady load; 0 blocks at once, at a socket wake-up per step.
    engine_busy_poll_s: float = Field(default=0.0, ge=0)
    # Skips torch.compile: starts in half the time on CPU, for development and tests.
    enforce_eager: bool = False
    seed: int = 0

    host: str = "0.0.0.0"
    port: int = Field(default=constants.DEFAULT_INFERENCE_PORT, ge=0, le=65535)
    # Prometheus metrics; 0 disables them.
    metrics_port: int = Field(default=constants.DEFAULT_METRICS_PORT_INFERENCE, ge=0, le=65535)

    # Calls beyond this many at once are refused with RESOURCE_EXHAUSTED.
    max_concurrent_requests: int = Field(default=4096, gt=0)
    # max_tokens of a Generate call that leaves it unset.
    default_max_tokens: int = Field(default=256, gt=0)
    max_embed_batch: int = Field(default=2048, gt=0)
    # gRPC message size limit, both ways. 4 MiB holds an embed batch of a few hundred long texts or
    # a prompt far beyond any context here; a bigger one is refused by gRPC before it is read.
    max_message_bytes: int = Field(default=4 * 1024 * 1024, gt=0, le=64 * 1024 * 1024)
    # A text longer than this (characters) is refused (or, for a truncating embed, cut) before it is
    # tokenized: tokenizing costs the server's CPU whatever the context. None: 16 characters per
    # token of the model's context, beyond what any text that fits could hold in practice.
    max_input_chars: int | None = Field(default=None, gt=0)
    # TLS: the server's certificate chain and key (PEM); both or neither. With a client CA file the
    # server also requires client certificates signed by it (mutual TLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # gRPC server reflection lets anyone who reaches the port list and describe its services: a
    # development aid (grpcurl), off unless asked for (`smallfirst dev` turns it on).
    reflection: bool = False
    # Connections are closed (GOAWAY) after this long, and their calls get the grace to finish:
    # clients then reconnect and resolve the service's DNS name again, which is how callers of a
    # headless Kubernetes service (dns:///, round_robin) find replicas added by a scale-up.
    max_connection_age_s: float = Field(default=300.0, gt=0)
    max_connection_age_grace_s: float = Field(default=120.0, ge=0)
    # After SIGTERM: how long in-flight calls may take to finish before they are cancelled.
    drain_grace_s: float = Field(default=30.0, ge=0)
    # How often the engine's liveness is checked; a dead engine makes the process exit non-zero.
    engine_check_interval_s: float = Field(default=1.0, gt=0)
    log_level: str = "INFO"
    log_json: bool = True

    @model_validator(mode="after")
    def _tls_pair(self) -> InferenceSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        return self.model_path.rstrip("/").rsplit("/", 1)[-1]

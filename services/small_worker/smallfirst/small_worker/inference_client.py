"""Client of the inference service, for the small-tier workers (no torch, no vLLM: gRPC and numpy).

One `InferenceClient` per worker process, shared by all its threads: the Celery small worker runs
a thread pool so that many jobs are in flight per process and the engine's batches fill. gRPC's
sync channels are thread-safe and multiplex every call over one HTTP/2 connection per replica.

- Channels are created lazily, on the first call in the process that makes it: a channel created
  before a fork hangs in the child (grpc/grpc#13464). A client used after a fork makes new ones.
- Each model maps to a target. `dns:///inference-embed:50051` resolves every address of a headless
  Kubernetes service and balances calls over them with round_robin; client-side health checking
  takes a replica out of the rotation as soon as it reports NOT_SERVING (it is draining).
- Each call has a deadline. UNAVAILABLE (a replica died or is draining) and RESOURCE_EXHAUSTED
  (a replica is full) are retried with exponential backoff and full jitter, within the deadline
  and a bounded number of attempts; round_robin sends the retry to the next replica.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from smallfirst.common import constants
from smallfirst.common.errors import Disposition, SmallfirstError
from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


# ---- errors ---------------------------------------------------------------------------------------
class InferenceError(SmallfirstError):
    """A call to the inference service failed; the subclass says how.

    By default the small tier could not answer this input, and the frontier can (ESCALATE);
    `status` is the gRPC status code, when there was one.
    """

    code = "inference_error"
    disposition = Disposition.ESCALATE

    def __init__(self, message: str, status: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.status = status


class InferenceUnavailable(InferenceError):
    """No replica could serve the call, after every retry (dead, draining, overloaded, unreachable).

    The service may be back soon: the task's `small_unavailable` policy says whether the job waits
    for it or goes to the frontier at once."""

    code = "inference_unavailable"
    disposition = Disposition.RETRY
    also_escalatable = True


class InferenceInvalidRequest(InferenceError):
    """The service refused the request itself (bad schema, empty prompt, wrong model kind)."""

    code = "inference_invalid_request"


class InferenceInputTooLong(InferenceInvalidRequest):
    """The prompt does not fit in the model's context (OUT_OF_RANGE)."""

    code = "inference_input_too_long"


class InferenceDeadlineExceeded(InferenceError):
    """The call's deadline passed; the server aborted the engine request."""

    code = "inference_deadline_exceeded"


class InferenceCancelled(InferenceError):
    """The call was cancelled."""

    code = "inference_cancelled"


class InferenceFailed(InferenceError):
    """Any other failure (INTERNAL, UNKNOWN...): a bug or an engine fault, not worth a retry here."""

    code = "inference_failed"


class UnknownModel(InferenceInvalidRequest):
    """No target is configured for this model name, or its target serves another model: the
    deployment and the catalog disagree. Final, so that it is seen instead of paid for."""

    code = "inference_unknown_model"
    disposition = Disposition.FINAL


def error_from_rpc(error: grpc.RpcError, attempts: int = 1) -> InferenceError:
    code = error.code() if isinstance(error, grpc.Call) else None
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    suffix = f" (after {attempts} attempts)" if attempts > 1 else ""
    message = f"{code.name if code else 'UNKNOWN'}: {details}{suffix}"
    if code in _RETRYABLE:
        return InferenceUnavailable(message, code)
    if code is grpc.StatusCode.OUT_OF_RANGE:
        return InferenceInputTooLong(message, code)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return InferenceInvalidRequest(message, code)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return InferenceDeadlineExceeded(message, code)
    if code is grpc.StatusCode.CANCELLED:
        return InferenceCancelled(message, code)
    return InferenceFailed(message, code)


# ---- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    model: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerationDelta:
    text: str
    finish_reason: str | None = None  # set on the last delta only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # (texts, dimensions) float32, rows of unit length
    prompt_tokens: int
    model: str
    # Tokens of each text, in order (empty from a server that does not report them).
    token_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    model: str
    kind: str  # "generate" or "embed"
    max_context_tokens: int
    embedding_dimensions: int


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 2.0
    multiplier: float = 2.0

    def backoff_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, capped exponential] (attempt counts from 1)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (attempt - 1))
        return random.uniform(0.0, ceiling)


@dataclass(frozen=True)
class Constraint:
    """At most one of the three."""

    json_schema: Mapping[str, Any] | str | None = None
    regex: str | None = None
    choices: Sequence[str] | None = None

    def message(self) -> pb.Constraint | None:
        given = [v is not None for v in (self.json_schema, self.regex, self.choices)]
        if sum(given) > 1:
            raise InferenceInvalidRequest("give at most one of json_schema, regex and choices")
        if self.json_schema is not None:
            schema = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
            return pb.Constraint(json_schema=schema)
        if self.regex is not None:
            return pb.Constraint(regex=self.regex)
        if self.choices is not None:
            return pb.Constraint(choices=pb.Choices(choices=list(self.choices)))
        return None


def parse_targets(spec: str) -> dict[str, str]:
    """`"model=target,model2=target2"` (as an environment variable holds it) to a mapping.

    A target may itself contain commas (`ipv4:10.0.0.1:50051,10.0.0.2:50051`); a part without
    `=` continues the previous target.
    """
    targets: dict[str, str] = {}
    last: str | None = None
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, sep, target = part.partition("=")
        if sep and name.strip() and target.strip():
            last = name.strip()
            targets[last] = target.strip()
        elif last is not None and not sep:
            targets[last] += f",{part}"
        else:
            raise ValueError(f"inference target {part!r} is not of the form model=target")
    if not targets:
        raise ValueError("no inference targets given (expected model=target[,model=target...])")
    return targets


# The inference server's default limit (InferenceSettings.max_message_bytes); both sides configurable.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ChannelTls:
    """TLS to the inference service: the CA that signed its certificate (None: the system's), and
    this client's certificate and key for a server that requires mutual TLS. PEM bytes."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_files(cls, ca_file: str | None, cert_file: str | None = None, key_file: str | None = None) -> ChannelTls:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca_file), read(cert_file), read(key_file))

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.root_certificates,
                                            private_key=self.private_key, certificate_chain=self.certificate_chain)


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    service_config = {
        "loadBalancingConfig": [{"round_robin": {}}],
        # The server reports NOT_SERVING while it drains: round_robin then skips it.
        "healthCheckConfig": {"serviceName": constants.INFERENCE_GRPC_SERVICE},
    }
    return [
        ("grpc.service_config", json.dumps(service_config)),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Must not ping more often than the server allows (constants.GRPC_SERVER_MIN_PING_INTERVAL_MS),
        # or it answers GOAWAY too_many_pings.
        ("grpc.keepalive_time_ms", constants.GRPC_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", constants.GRPC_KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Reconnect quickly after a replica restarts (the default starts at 1 s and grows to 120 s).
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5_000),
    ]


class InferenceClient:
    """Calls the inference service; thread-safe, fork-safe, one instance per worker process."""

    def __init__(
        self,
        targets: Mapping[str, str],
        *,
        default_timeout_s: float = 30.0,
        retry: RetryPolicy | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
        tls: ChannelTls | None = None,
    ) -> None:
        if not targets:
            raise ValueError("an inference client needs at least one model target")
        self.targets = dict(targets)
        self.default_timeout_s = default_timeout_s
        self.retry = retry or RetryPolicy()
        self._options = list(options) if options is not None else channel_options()
        self._tls = tls
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, pb_grpc.InferenceServiceStub] = {}
        self._infos: dict[str, ModelInfo] = {}

    # ---- calls ------------------------------------------------------------------------------------
    def generate(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Generation:
        """A completion of `prompt`, or of chat `messages` as (role, content) pairs."""
        request = _generate_request(model, prompt, messages, temperature, top_p, max_tokens, stop, seed,
                                    constraint, logprobs, request_id)
        response = self._call(model, lambda stub, t: stub.Generate(request, timeout=t), timeout_s)
        return Generation(
            text=response.text,
            finish_reason=_FINISH_REASONS.get(response.finish_reason, "stop"),
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
            model=response.model or model,
            logprobs=_logprobs(response.logprobs),
        )

    def generate_stream(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
        constraint: Constraint | None = None,
        logprobs: int | None = None,
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> Generator[GenerationDelta, None, None]:
        """Text deltas as they are generated. Not retried: a replay would repeat text already given.

        Closing the iterator early cancels the call, which aborts the engine request.
        """
        request = _generate_request(model, prompt, messages, temperature, top_p, max_tokens, stop, seed,
                                    constraint, logprobs, request_id)
        stub = self._stub(model)
        call = stub.GenerateStream(request, timeout=timeout_s or self.default_timeout_s)
        try:
            for message in call:
                yield GenerationDelta(
                    text=message.text,
                    finish_reason=_FINISH_REASONS.get(message.finish_reason),
                    prompt_tokens=message.usage.prompt_tokens,
                    completion_tokens=message.usage.completion_tokens,
                    logprobs=_logprobs(message.logprobs),
                )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()

    def embed(self, model: str, texts: Sequence[str], *, truncate: bool = False, timeout_s: float | None = None,
              request_id: str = "") -> Embeddings:
        request = pb.EmbedRequest(model=model, texts=list(texts), truncate=truncate, request_id=request_id)
        response = self._call(model, lambda stub, t: stub.Embed(request, timeout=t), timeout_s)
        if len(response.embeddings) != len(texts):
            raise InferenceFailed(f"asked for {len(texts)} embeddings, got {len(response.embeddings)}")
        vectors = np.array([e.values for e in response.embeddings], dtype=np.float32)
        counts = tuple(int(e.prompt_tokens) for e in response.embeddings)
        return Embeddings(vectors=vectors, prompt_tokens=response.usage.prompt_tokens, model=response.model or model,
                          token_counts=counts if sum(counts) == response.usage.prompt_tokens else ())

    def model_info(self, model: str, timeout_s: float | None = None) -> ModelInfo:
        """What `model`'s servers serve; asked once per process and remembered."""
        cached = self._infos.get(model)
        if cached is not None:
            return cached
        response = self._call(model, lambda stub, t: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=t),
                              timeout_s)
        info = ModelInfo(
            model=response.model,
            kind="embed" if response.kind == pb.MODEL_KIND_EMBED else "generate",
            max_context_tokens=response.max_context_tokens,
            embedding_dimensions=response.embedding_dimensions,
        )
        if info.model != model:
            raise UnknownModel(f"the target of {model!r} serves {info.model!r}; fix the inference targets")
        self._infos[model] = info
        return info

    def close(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                for channel in self._channels.values():
                    channel.close()
            self._channels.clear()
            self._stubs.clear()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------------------------
    def _stub(self, model: str) -> pb_grpc.InferenceServiceStub:
        pid = os.getpid()
        with self._lock:
            if self._pid != pid:
                # A fork copied the parent's channels; they must not be used (nor closed) here.
                self._channels = {}
                self._stubs = {}
                self._pid = pid
            stub = self._stubs.get(model)
            if stub is None:
                target = self.targets.get(model)
                if target is None:
                    raise UnknownModel(f"no inference target for model {model!r}; known: {sorted(self.targets)}")
                channel = (grpc.secure_channel(target, self._tls.credentials(), options=self._options)
                           if self._tls is not None else grpc.insecure_channel(target, options=self._options))
                self._channels[model] = channel
                stub = self._stubs[model] = pb_grpc.InferenceServiceStub(channel)
            return stub

    def _call(self, model: str, invoke: Callable[[pb_grpc.InferenceServiceStub, float], T],
              timeout_s: float | None) -> T:
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.default_timeout_s)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise InferenceDeadlineExceeded(f"deadline passed before attempt {attempt} on {model}",
                                                grpc.StatusCode.DEADLINE_EXCEEDED)
            try:
                return invoke(self._stub(model), remaining)
            except grpc.RpcError as exc:
                error = error_from_rpc(exc, attempt)
                if not isinstance(error, InferenceUnavailable) or attempt >= self.retry.max_attempts:
                    raise error from exc
                pause = self.retry.backoff_s(attempt)
                if time.monotonic() + pause >= deadline:
                    raise error from exc
                log.info("inference call to %s failed (%s); retry %d in %.0f ms", model, error, attempt, pause * 1e3)
                time.sleep(pause)


def _generate_request(
    model: str, prompt: str | None, messages: Sequence[tuple[str, str]] | None, temperature: float | None,
    top_p: float | None, max_tokens: int | None, stop: Sequence[str], seed: int | None,
    constraint: Constraint | None, logprobs: int | None, request_id: str,
) -> pb.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise InferenceInvalidRequest("give exactly one of prompt and messages")
    request = pb.GenerateRequest(model=model, request_id=request_id or uuid.uuid4().hex)
    if prompt is not None:
        request.prompt = prompt
    else:
        assert messages is not None
        request.chat.messages.extend(pb.ChatMessage(role=role, content=content) for role, content in messages)
    sampling = request.sampling
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    sampling.stop.extend(stop)
    if seed is not None:
        sampling.seed = seed
    message = constraint.message() if constraint is not None else None
    if message is not None:
        request.constraint.CopyFrom(message)
    if logprobs is not None:
        request.logprobs = logprobs
    return request


def _logprobs(items: Sequence[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(item.token, item.logprob, tuple((t.token, t.logprob) for t in item.top)) for item in items
    )


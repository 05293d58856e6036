"""vLLM's AsyncLLM behind plain Python types, so that the gRPC servicer only translates.

One engine serves one model. Requests from every concurrent call go to the same AsyncLLM, whose
scheduler batches them continuously. The wrapper tokenizes prompts itself (and renders chat
messages with the model's chat template) so that a prompt longer than the context is refused with
a clear error before it reaches the engine, and so that usage counts are exact.

Cancellation: when the task consuming `AsyncLLM.generate`/`encode` is cancelled (the gRPC call
was cancelled or its deadline passed), vLLM aborts the engine request. A stream can also be
closed while it waits at a `yield`; its generators are closed explicitly, so that abort happens
then too rather than when the garbage collector gets to them.

Per call, the front end's CPU is what bounds a small model's throughput (bench/small_tier.py), so
the wrapper keeps vLLM's per-request work to what a call needs: prompts go in as rendered token
inputs, sampling parameters are not deep-copied, and a whole answer is decoded once at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import jinja2
import jsonschema
import numpy as np
from vllm import envs as vllm_envs
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.inputs import tokens_input
from vllm.outputs import PoolingRequestOutput, RequestOutput
from vllm.platforms import current_platform
from vllm.pooling_params import PoolingParams
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

from smallfirst.common.errors import SmallfirstError
from smallfirst.inference.dtypes import platform_dtype
from smallfirst.inference.engine_processes import BUSY_POLL_ENV, SpinLimitedExecutor
from smallfirst.inference.settings import InferenceSettings
from smallfirst.inference.tokenization import PromptTokenizer

log = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_LOGPROBS = 20
# A token of the vocabularies served here rarely covers more than a few characters; a text of more
# than this many characters per token of the context cannot fit, and is refused before tokenizing.
CHARS_PER_CONTEXT_TOKEN = 16
# Prompts longer than this are tokenized in a thread so a long one does not stall every other call.
_INLINE_TOKENIZE_MAX_CHARS = 4096


class InferenceError(SmallfirstError):
    """Base of the errors a call can end with; each maps to one gRPC status code."""


class InvalidRequestError(InferenceError):
    """The request cannot be served as sent (empty prompt, bad schema, wrong model kind...)."""


class ContextLengthError(InferenceError):
    """The prompt does not fit in the model's context."""


class EngineUnavailableError(InferenceError):
    """The engine is dead or shutting down; another replica may serve the call."""


class EngineFailedError(InferenceError):
    """The engine failed this one request but is still alive."""


def engine_error(exc: EngineDeadError | VLLMClientError | EngineGenerateError) -> InferenceError:
    """The typed error of this module that a vLLM exception stands for."""
    if isinstance(exc, EngineDeadError):
        return EngineUnavailableError("the inference engine is dead")
    if isinstance(exc, VLLMClientError):
        return InvalidRequestError(str(exc))
    return EngineFailedError(f"the engine failed the request: {exc.__cause__ or exc}")


class ModelKind(StrEnum):
    GENERATE = "generate"
    EMBED = "embed"


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True)
class JsonSchemaConstraint:
    schema: str


@dataclass(frozen=True)
class RegexConstraint:
    pattern: str


@dataclass(frozen=True)
class ChoicesConstraint:
    choices: tuple[str, ...]


Constraint = JsonSchemaConstraint | RegexConstraint | ChoicesConstraint


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt` and `messages`."""

    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    constraint: Constraint | None = None
    logprobs: int | None = None
    request_id: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass
class GenerationChunk:
    """Text generated since the previous chunk; the last one has a finish reason."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class EmbeddingBatch:
    vectors: np.ndarray  # (texts, dimensions) float32, each row of unit length
    prompt_tokens: int
    token_counts: tuple[int, ...] = ()  # per text, in order; they sum to prompt_tokens


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: ModelKind
    max_context_tokens: int
    embedding_dimensions: int = 0


def engine_args(settings: InferenceSettings) -> AsyncEngineArgs:
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "served_model_name": settings.model_name,
        "runner": settings.runner,
        "dtype": platform_dtype(settings.dtype).dtype,
        "load_format": settings.load_format,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "enforce_eager": settings.enforce_eager,
        "seed": settings.seed,
        # The engine's own Prometheus metrics (vllm:*) are served next to ours.
        "disable_log_stats": not settings.engine_metrics,
        "enable_log_requests": False,
    }
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    if settings.kv_cache_space_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(settings.kv_cache_space_gib * 2**30)
    if settings.max_num_seqs is not None:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if settings.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if current_platform.is_cpu():
        # The engine core and its model worker block between steps instead of spinning for a
        # second after each (engine_processes.py). On GPU vLLM runs one model in the core's own
        # process, with no such queue between them.
        kwargs["distributed_executor_backend"] = SpinLimitedExecutor
    return AsyncEngineArgs(**kwargs)


class VllmEngine:
    """One model served by one AsyncLLM; every method is safe to call from many tasks at once."""

    def __init__(self, llm: AsyncLLM, model_name: str, kind: ModelKind, default_max_tokens: int,
                 max_embed_batch: int, max_input_chars: int | None = None) -> None:
        self._llm = llm
        self._tokenizer = llm.get_tokenizer()
        self.model_name = model_name
        self.kind = kind
        self.max_context_tokens = int(llm.model_config.max_model_len)
        self._prompts = PromptTokenizer(self._tokenizer, self.max_context_tokens)
        self.max_input_chars = max_input_chars or CHARS_PER_CONTEXT_TOKEN * self.max_context_tokens
        self._default_max_tokens = default_max_tokens
        self._max_embed_batch = max_embed_batch
        self._embedding_dimensions = 0

    @classmethod
    def start(cls, settings: InferenceSettings) -> VllmEngine:
        """Start the engine (its core runs in a child process); takes seconds to minutes."""
        # Read by the engine's processes, which inherit this environment (engine_processes.py).
        os.environ[BUSY_POLL_ENV] = repr(settings.engine_busy_poll_s)
        dtype = platform_dtype(settings.dtype)
        log.info("%s: dtype %s (%s)", settings.model_name, dtype.dtype, dtype.reason)
        llm = AsyncLLM.from_engine_args(engine_args(settings))
        # vLLM reads its VLLM_* variables from os.environ on every access unless told to cache
        # them; its engine core and workers turn the cache on once started, its front end does
        # not, and the per-token statistics read one for every output (about a tenth of the
        # front end's CPU with many short requests in flight).
        vllm_envs.enable_envs_cache()
        kind = ModelKind.EMBED if llm.model_config.runner_type == "pooling" else ModelKind.GENERATE
        return cls(llm, settings.model_name, kind, settings.default_max_tokens, settings.max_embed_batch,
                   settings.max_input_chars)

    async def warm_up(self) -> None:
        """One tiny request, so the first real call is not slow and the embedding width is known."""
        if self.kind is ModelKind.EMBED:
            batch = await self.embed(["warm up"], truncate=True, request_id="warmup")
            self._embedding_dimensions = int(batch.vectors.shape[1])
        else:
            await self.generate(GenerationRequest(prompt="warm up", max_tokens=1, request_id="warmup"))

    def info(self) -> ModelInfo:
        return ModelInfo(self.model_name, self.kind, self.max_context_tokens, self._embedding_dimensions)

    @property
    def errored(self) -> bool:
        return bool(self._llm.errored)

    def unfinished_requests(self) -> int:
        """Requests the engine still holds; zero once every cancelled call has been aborted."""
        return int(self._llm.get_num_unfinished_requests())

    def shutdown(self) -> None:
        self._llm.shutdown()

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> Completion:
        chunks = [chunk async for chunk in self._generate(request, RequestOutputKind.FINAL_ONLY)]
        last = chunks[-1]
        assert last.finish_reason is not None
        return Completion(
            text=last.text,
            finish_reason=last.finish_reason,
            prompt_tokens=last.prompt_tokens,
            completion_tokens=last.completion_tokens,
            logprobs=last.logprobs,
        )

    def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        return self._generate(request, RequestOutputKind.DELTA)

    async def _generate(
        self, request: GenerationRequest, kind: RequestOutputKind
    ) -> AsyncGenerator[GenerationChunk, None]:
        self._require(ModelKind.GENERATE)
        prompt_ids = await self._prompt_ids(request)
        room = self.max_context_tokens - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_context_tokens} "
                "tokens, prompt and completion together"
            )
        params = self._sampling_params(request, room, kind)
        request_id = _engine_request_id(request.request_id)
        completion_tokens = 0
        try:
            # A rendered token input goes to the engine as is; a TokensPrompt would be processed
            # again in vLLM's thread pool, a thread hop per call for nothing.
            # Closed explicitly: a call closed at our `yield` (a cancelled stream) aborts the
            # engine request at once, not when the garbage collector finalizes the generator.
            async with aclosing(self._llm.generate(tokens_input(prompt_ids), params, request_id)) as outputs:
                async for output in outputs:
                    chunk = self._chunk(output, request, params)
                    completion_tokens = (
                        completion_tokens + chunk.completion_tokens
                        if kind is RequestOutputKind.DELTA
                        else chunk.completion_tokens
                    )
                    chunk.prompt_tokens = len(prompt_ids)
                    chunk.completion_tokens = completion_tokens
                    if chunk.text or chunk.logprobs or chunk.finish_reason is not None:
                        yield chunk
        except (EngineDeadError, VLLMClientError, EngineGenerateError) as exc:
            raise engine_error(exc) from exc

    def _chunk(self, output: RequestOutput, request: GenerationRequest, params: SamplingParams) -> GenerationChunk:
        completion = output.outputs[0]
        finish: FinishReason | None = None
        if output.finished:
            reason = completion.finish_reason
            if reason == "abort":
                # The engine dropped the request without our asking: it is being shut down.
                raise EngineUnavailableError("the engine aborted the request (shutting down)")
            if reason == "error":
                raise EngineFailedError("the engine failed the request")
            finish = FinishReason.LENGTH if reason == "length" else FinishReason.STOP
        logprobs: list[TokenLogprob] = []
        if request.logprobs is not None and completion.logprobs:
            logprobs = [
                self._token_logprob(token_id, alternatives, request.logprobs)
                for token_id, alternatives in zip(completion.token_ids, completion.logprobs, strict=False)
            ]
        return GenerationChunk(
            text=completion.text if params.detokenize else self._prompts.decode(completion.token_ids),
            logprobs=logprobs,
            finish_reason=finish,
            completion_tokens=len(completion.token_ids),
        )

    def _token_logprob(self, token_id: int, alternatives: dict[int, Any] | None, top: int) -> TokenLogprob:
        alternatives = alternatives or {}
        chosen = alternatives.get(token_id)
        ranked = sorted(alternatives.items(), key=lambda item: item[1].rank or 0)
        return TokenLogprob(
            token=self._decoded(token_id, chosen),
            logprob=float(chosen.logprob) if chosen is not None else float("nan"),
            top=tuple((self._decoded(tid, lp), float(lp.logprob)) for tid, lp in ranked[:top]),
        )

    def _decoded(self, token_id: int, logprob: Any) -> str:
        decoded = getattr(logprob, "decoded_token", None)
        return decoded if isinstance(decoded, str) else str(self._tokenizer.decode([token_id]))

    async def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            if not request.messages:
                raise InvalidRequestError("chat messages are empty")
            for message in request.messages:
                if message.role not in CHAT_ROLES:
                    raise InvalidRequestError(f"unknown chat role {message.role!r}; known: {sorted(CHAT_ROLES)}")
            conversation: list[Any] = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                text = self._tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            except (ValueError, TypeError, jinja2.TemplateError) as exc:
                raise InvalidRequestError(f"the model's chat template cannot render these messages: {exc}") from exc
            # The template writes the special tokens (BOS) itself.
            return await self._encode(str(text), add_special_tokens=False)
        if not request.prompt or not request.prompt.strip():
            raise InvalidRequestError("the prompt is empty")
        return await self._encode(request.prompt, add_special_tokens=True)

    async def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        self._check_chars(text, "the prompt")
        if len(text) <= _INLINE_TOKENIZE_MAX_CHARS:
            return self._prompts.encode(text, add_special_tokens)
        return await asyncio.to_thread(self._prompts.encode, text, add_special_tokens)

    def _sampling_params(self, request: GenerationRequest, room: int, kind: RequestOutputKind) -> SamplingParams:
        if not 0.0 <= request.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be within [0, 2], got {request.temperature}")
        if not 0.0 < request.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be within (0, 1], got {request.top_p}")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be within [0, {MAX_LOGPROBS}], got {request.logprobs}")
        if any(not s for s in request.stop):
            raise InvalidRequestError("stop strings must not be empty")
        max_tokens = request.max_tokens or self._default_max_tokens
        if isinstance(request.constraint, ChoicesConstraint) and request.constraint.choices:
            # A choice cut off by max_tokens is no choice at all (an invalid answer). The grammar lets
            # the model spell a choice with any tokens, down to one byte each, so the room needed
            # is the longest choice's UTF-8 length plus the end of sequence, not its usual
            # tokenization. Once a choice is complete the grammar forces the end: the room is free.
            max_tokens = max(max_tokens, max(len(c.encode("utf-8")) for c in request.constraint.choices) + 1)
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=min(max_tokens, room),
            stop=list(request.stop) or None,
            seed=request.seed,
            logprobs=request.logprobs,
            structured_outputs=_structured_outputs(request.constraint),
            output_kind=kind,
            detokenize=self._needs_engine_detokenizer(request, kind),
            # Made for this one request and never reused: vLLM's defensive deep copy of it
            # (per call, in the front end's thread) buys nothing here.
            skip_clone=True,
        )

    def _needs_engine_detokenizer(self, request: GenerationRequest, kind: RequestOutputKind) -> bool:
        # vLLM detokenizes every request at every engine step, which only streaming, stop strings
        # and logprobs' token texts need; otherwise the answer is decoded once at the end (the
        # same text: vLLM's fast detokenizer is the same Rust tokenizer's decode stream).
        return (kind is RequestOutputKind.DELTA or bool(request.stop) or request.logprobs is not None
                or not self._prompts.uses_rust_tokenizer)

    # ---- embeddings -----------------------------------------------------------------------------
    async def embed(self, texts: Sequence[str], truncate: bool, request_id: str = "") -> EmbeddingBatch:
        self._require(ModelKind.EMBED)
        if not texts:
            raise InvalidRequestError("no texts to embed")
        if len(texts) > self._max_embed_batch:
            raise InvalidRequestError(f"at most {self._max_embed_batch} texts per call, got {len(texts)}")
        for index, text in enumerate(texts):
            if not text.strip():
                raise InvalidRequestError(f"text {index} is empty")
        if truncate:
            # What lies beyond the limit is cut by truncation anyway: never tokenize it.
            texts = [text[: self.max_input_chars] for text in texts]
        else:
            for index, text in enumerate(texts):
                self._check_chars(text, f"text {index}")
        token_ids = await self._encode_batch(texts, truncate)
        for index, ids in enumerate(token_ids):
            if len(ids) > self.max_context_tokens:
                raise ContextLengthError(
                    f"text {index} has {len(ids)} tokens; the model takes at most {self.max_context_tokens} "
                    "(set truncate to cut it)"
                )
        base_id = _engine_request_id(request_id)
        try:
            outputs = await asyncio.gather(*(
                self._embed_one(ids, f"{base_id}-{index}") for index, ids in enumerate(token_ids)
            ))
        except (EngineDeadError, VLLMClientError, EngineGenerateError) as exc:
            raise engine_error(exc) from exc
        vectors = np.stack([output.outputs.data.float().numpy() for output in outputs]).astype(np.float32)
        # Normalized here whatever the model's pooler does, so a dot product is the cosine.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.where(norms > 0, norms, 1.0)
        counts = tuple(len(ids) for ids in token_ids)
        return EmbeddingBatch(vectors=vectors, prompt_tokens=sum(counts), token_counts=counts)

    async def _embed_one(self, token_ids: list[int], request_id: str) -> PoolingRequestOutput:
        final: PoolingRequestOutput | None = None
        async for output in self._llm.encode(
            tokens_input(token_ids), PoolingParams(task="embed"), request_id
        ):
            final = output
        if final is None or not final.finished:
            raise EngineUnavailableError("the engine ended the request without a result (shutting down)")
        return final

    async def _encode_batch(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        if sum(len(text) for text in texts) <= _INLINE_TOKENIZE_MAX_CHARS:
            return self._prompts.encode_batch(texts, truncate)
        return await asyncio.to_thread(self._prompts.encode_batch, texts, truncate)

    def _check_chars(self, text: str, what: str) -> None:
        """Refuse a text too long to fit before tokenizing it: tokenizing megabytes costs the
        front end's one thread whatever the context."""
        if len(text) > self.max_input_chars:
            raise ContextLengthError(f"{what} has {len(text)} characters; this server tokenizes at most "
                                     f"{self.max_input_chars} (the model takes {self.max_context_tokens} tokens)")

    def _require(self, kind: ModelKind) -> None:
        if self.kind is not kind:
            served = "an embedding model" if self.kind is ModelKind.EMBED else "a generator"
            raise InvalidRequestError(f"this server serves {served} ({self.model_name}); call {self._method_for()}")

    def _method_for(self) -> str:
        return "Embed" if self.kind is ModelKind.EMBED else "Generate or GenerateStream"


def _structured_outputs(constraint: Constraint | None) -> StructuredOutputsParams | None:
    if constraint is None:
        return None
    if isinstance(constraint, JsonSchemaConstraint):
        try:
            schema = json.loads(constraint.schema)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"json_schema is not valid JSON: {exc}") from exc
        if not isinstance(schema, dict):
            raise InvalidRequestError("json_schema must be a JSON object")
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise InvalidRequestError(f"json_schema is not a valid JSON schema: {exc.message}") from exc
        return StructuredOutputsParams(json=schema)
    if isinstance(constraint, RegexConstraint):
        if not constraint.pattern:
            raise InvalidRequestError("regex is empty")
        return StructuredOutputsParams(regex=constraint.pattern)
    if not constraint.choices or any(not choice for choice in constraint.choices):
        raise InvalidRequestError("choices must be a non-empty list of non-empty strings")
    return StructuredOutputsParams(choice=list(constraint.choices))


# One engine per process: the pid and a counter make ids unique for its whole life, for less
# than a uuid4 costs per call.
_REQUEST_SERIAL = itertools.count()


def _engine_request_id(caller_id: str) -> str:
    # Unique even when a caller reuses its id (a retried job): the engine refuses duplicate ids.
    suffix = f"{os.getpid():x}-{next(_REQUEST_SERIAL):x}"
    return f"{caller_id[:64]}-{suffix}" if caller_id else suffix

"""The gRPC servicer: checks and translates messages, delegates to the engine, maps errors to codes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import grpc

from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from smallfirst.inference.engine import (
    ChatMessage,
    ChoicesConstraint,
    Completion,
    Constraint,
    ContextLengthError,
    EngineFailedError,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    InferenceError,
    InvalidRequestError,
    JsonSchemaConstraint,
    ModelKind,
    RegexConstraint,
    TokenLogprob,
    VllmEngine,
)
from smallfirst.inference.metrics import InferenceMetrics

log = logging.getLogger(__name__)

_ERROR_CODES: dict[type[InferenceError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ContextLengthError: grpc.StatusCode.OUT_OF_RANGE,
    EngineUnavailableError: grpc.StatusCode.UNAVAILABLE,
    EngineFailedError: grpc.StatusCode.INTERNAL,
}
_FINISH_REASONS = {FinishReason.STOP: pb.FINISH_REASON_STOP, FinishReason.LENGTH: pb.FINISH_REASON_LENGTH}


class ShuttingDownError(EngineUnavailableError):
    """The server is draining; the caller should go to another replica."""


class Admission:
    """Counts calls in flight and refuses new ones once the server drains."""

    def __init__(self) -> None:
        self.accepting = True
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        if not self.accepting:
            raise ShuttingDownError("the server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()

    def exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True when every call finished within the timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, engine: VllmEngine, admission: Admission, metrics: InferenceMetrics) -> None:
        self._engine = engine
        self._admission = admission
        self._metrics = metrics

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        async with self._call("Generate", context):
            self._check_model(request.model)
            completion = await self._engine.generate(generation_request(request))
            self._count_tokens(completion.prompt_tokens, completion.completion_tokens)
            return generate_response(completion, self._engine.model_name)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with self._call("GenerateStream", context):
            self._check_model(request.model)
            # Closed explicitly, so a cancelled call aborts its engine request now, not when the
            # garbage collector finalizes the generators.
            async with aclosing(self._engine.stream(generation_request(request))) as chunks:
                async for chunk in chunks:
                    message = pb.GenerateStreamResponse(text=chunk.text, logprobs=_logprobs(chunk.logprobs))
                    if chunk.finish_reason is not None:
                        message.finish_reason = _FINISH_REASONS[chunk.finish_reason]
                        message.usage.prompt_tokens = chunk.prompt_tokens
                        message.usage.completion_tokens = chunk.completion_tokens
                        self._count_tokens(chunk.prompt_tokens, chunk.completion_tokens)
                    yield message

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        async with self._call("Embed", context):
            self._check_model(request.model)
            batch = await self._engine.embed(list(request.texts), request.truncate, request.request_id)
            self._count_tokens(batch.prompt_tokens, 0)
            return pb.EmbedResponse(
                embeddings=[pb.Embedding(values=row, prompt_tokens=tokens)
                            for row, tokens in zip(batch.vectors.tolist(), batch.token_counts, strict=True)],
                usage=pb.Usage(prompt_tokens=batch.prompt_tokens),
                model=self._engine.model_name,
            )

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        info = self._engine.info()
        return pb.GetModelInfoResponse(
            model=info.name,
            kind=pb.MODEL_KIND_EMBED if info.kind is ModelKind.EMBED else pb.MODEL_KIND_GENERATE,
            max_context_tokens=info.max_context_tokens,
            embedding_dimensions=info.embedding_dimensions,
        )

    def _check_model(self, model: str) -> None:
        if model and model != self._engine.model_name:
            raise InvalidRequestError(f"this server serves {self._engine.model_name!r}, not {model!r}")

    def _count_tokens(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._metrics.prompt_tokens.labels(self._metrics.model).inc(prompt_tokens)
        if completion_tokens:
            self._metrics.generated_tokens.labels(self._metrics.model).inc(completion_tokens)

    @asynccontextmanager
    async def _call(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Admission, metrics, and the mapping of errors to status codes around one call."""
        model = self._metrics.model
        code = grpc.StatusCode.OK
        in_flight = self._metrics.requests_in_flight.labels(model, method)
        admitted = False
        in_flight.inc()
        try:
            self._admission.enter()
            admitted = True
            yield
        except InferenceError as exc:
            code = _code_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", method, exc)
            await context.abort(code, str(exc))
        except (asyncio.CancelledError, GeneratorExit):
            # The call was cancelled or ran out of time; vLLM aborted the engine request. A stream
            # cancelled while gRPC was sending one of its messages is not cancelled inside this
            # generator: gRPC closes it afterwards, which raises GeneratorExit at its `yield`.
            remaining = context.time_remaining()
            code = (
                grpc.StatusCode.DEADLINE_EXCEEDED
                if remaining is not None and remaining <= 0
                else grpc.StatusCode.CANCELLED
            )
            self._metrics.aborted_requests.labels(model).inc()
            raise
        finally:
            in_flight.dec()
            self._metrics.requests.labels(model, method, code.name).inc()
            if admitted:
                self._admission.exit()


def _code_for(exc: InferenceError) -> grpc.StatusCode:
    for kind, code in _ERROR_CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


# ---- messages <-> engine types --------------------------------------------------------------------
def generation_request(request: pb.GenerateRequest) -> GenerationRequest:
    which = request.WhichOneof("input")
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    if which == "prompt":
        prompt = request.prompt
    elif which == "chat":
        messages = tuple(ChatMessage(m.role, m.content) for m in request.chat.messages)
    else:
        raise InvalidRequestError("a prompt or chat messages are required")
    sampling = request.sampling
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        temperature=sampling.temperature if sampling.HasField("temperature") else 1.0,
        top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
        max_tokens=sampling.max_tokens or None,
        stop=tuple(sampling.stop),
        seed=sampling.seed if sampling.HasField("seed") else None,
        constraint=_constraint(request),
        logprobs=request.logprobs if request.HasField("logprobs") else None,
        request_id=request.request_id,
    )


def _constraint(request: pb.GenerateRequest) -> Constraint | None:
    if not request.HasField("constraint"):
        return None
    constraint = request.constraint
    kind = constraint.WhichOneof("kind")
    if kind == "json_schema":
        return JsonSchemaConstraint(constraint.json_schema)
    if kind == "regex":
        return RegexConstraint(constraint.regex)
    if kind == "choices":
        return ChoicesConstraint(tuple(constraint.choices.choices))
    return None


def generate_response(completion: Completion, model: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=completion.text,
        finish_reason=_FINISH_REASONS[completion.finish_reason],
        usage=pb.Usage(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens),
        logprobs=_logprobs(completion.logprobs),
        model=model,
    )


def _logprobs(logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token=item.token,
            logprob=item.logprob,
            top=[pb.TopLogprob(token=token, logprob=value) for token, value in item.top],
        )
        for item in logprobs
    ]

"""The Messages-API simulator: a development and test stand-in for Anthropic's API.

It speaks enough of `POST /v1/messages` for the official SDK (`base_url`): text answers, forced
tool use, native structured outputs (`output_config.format`), usage figures, request ids and the
API's error bodies and status codes, and the Message Batches API (`/v1/messages/batches`, see
`batches.py`) whose requests are answered by the same code. Faults are injected per request
(`x-sim-fault` header), queued for the next requests (`POST /_sim/faults`) or drawn at configured
rates. `GET /_sim/stats` counts
what it received, with arrival times, so tests can check call counts across processes.

It is not the real API and never claims to be: every response carries `x-smallfirst-simulator`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from smallfirst.common.constants import HEADER_FRONTIER_SIMULATOR, HEADER_SIM_FAULT
from smallfirst.common.pricing import load_price_table
from smallfirst.frontier_sim.answers import Answer, Oracle, Responder, Script
from smallfirst.frontier_sim.batches import BatchStore, batch_body
from smallfirst.frontier_sim.faults import (
    BatchOutcomeInjector,
    BatchOutcomesRequest,
    Fault,
    FaultInjector,
    FaultKind,
    FaultRequest,
    FaultSpecError,
)
from smallfirst.frontier_sim.protocol import (
    CHARS_PER_TOKEN,
    ApiError,
    SimRequest,
    estimate_tokens,
    invalid,
    parse_request,
)
from smallfirst.frontier_sim.settings import FrontierSimSettings

HEADER_REQUEST_ID = "request-id"
SIM_MODEL_CREATED_AT = "2026-01-01T00:00:00Z"


class DroppedResponse(Response):
    """Starts a response and stops half-way: the client sees the connection closed mid-body.

    ASGI has no way to reset a socket; a declared Content-Length that is never met makes the server
    close the connection, which clients report as a dropped connection (httpx: RemoteProtocolError).
    """

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"4096")]})
        await send({"type": "http.response.body", "body": b'{"id":"msg_', "more_body": True})


class Simulator:
    """The simulator's state and behaviour; the routes only translate HTTP to and from it."""

    def __init__(self, settings: FrontierSimSettings, responder_factory: Callable[[], Responder],
                 models: tuple[str, ...], sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self._responder_factory = responder_factory
        self.responder = responder_factory()
        self.models = models
        self.faults = FaultInjector(settings.fault_rates, settings.fault_seed, settings.fault_retry_after_s,
                                    settings.fault_slow_ms)
        self._sleep = sleep
        self._no_native = frozenset(settings.models_without_native_structured_output)
        self.batches = BatchStore(
            self._batch_answer,
            BatchOutcomeInjector(settings.batch_errored_rate, settings.batch_expired_rate,
                                 settings.batch_outcome_seed),
            processing_s=settings.batch_processing_s, expiry_s=settings.batch_expiry_s,
            cancel_s=settings.batch_cancel_s)
        self._reset_stats()

    def _reset_stats(self) -> None:
        self.requests_total = 0
        self.requests_by_model: Counter[str] = Counter()
        self.responses_by_status: Counter[str] = Counter()
        self.faults_served: Counter[str] = Counter()
        self.answers_by_source: Counter[str] = Counter()
        self.input_tokens_by_model: Counter[str] = Counter()
        self.output_tokens_by_model: Counter[str] = Counter()
        # Requests answered inside Message Batches, apart from the realtime figures above.
        self.batch_requests_by_model: Counter[str] = Counter()
        self.batch_input_tokens_by_model: Counter[str] = Counter()
        self.batch_output_tokens_by_model: Counter[str] = Counter()
        self.request_log: deque[dict[str, Any]] = deque(maxlen=self.settings.request_log_size)

    def reset(self) -> None:
        self.faults.clear()
        self.batches.reset()
        self.responder = self._responder_factory()
        self._reset_stats()

    def stats(self, include_log: bool) -> dict[str, Any]:
        data: dict[str, Any] = {
            "simulator": True,
            "requests_total": self.requests_total,
            "requests_by_model": dict(self.requests_by_model),
            "responses_by_status": dict(self.responses_by_status),
            "faults_served": dict(self.faults_served),
            "faults_pending": self.faults.pending(),
            "answers_by_source": dict(self.answers_by_source),
            "answer_misses": self.responder.misses,
            "input_tokens_by_model": dict(self.input_tokens_by_model),
            "output_tokens_by_model": dict(self.output_tokens_by_model),
            "batches": {**self.batches.stats(),
                        "requests_by_model": dict(self.batch_requests_by_model),
                        "input_tokens_by_model": dict(self.batch_input_tokens_by_model),
                        "output_tokens_by_model": dict(self.batch_output_tokens_by_model)},
        }
        if include_log:
            data["requests"] = list(self.request_log)
        return data

    def check_key(self, headers: Mapping[str, str]) -> None:
        key = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not key:
            raise ApiError(401, "authentication_error", "x-api-key header is required")
        if self.settings.api_key and not secrets.compare_digest(key, self.settings.api_key):
            raise ApiError(401, "authentication_error", "invalid x-api-key")

    async def messages(self, headers: Mapping[str, str], raw_body: bytes) -> Response:
        arrived_at = time.time()
        request_id = f"req_sim_{secrets.token_hex(12)}"
        entry: dict[str, Any] = {"t": arrived_at, "request_id": request_id, "model": None, "output": None,
                                 "status": None, "fault": None}
        self.requests_total += 1
        self.request_log.append(entry)
        try:
            response = await self._messages(headers, raw_body, request_id, entry)
        except ApiError as exc:
            entry["status"] = exc.status_code
            self.responses_by_status[str(exc.status_code)] += 1
            return error_response(exc, request_id)
        if not isinstance(response, DroppedResponse):
            entry["status"] = response.status_code
        self.responses_by_status[str(entry["status"])] += 1
        return response

    async def _messages(self, headers: Mapping[str, str], raw_body: bytes, request_id: str,
                        entry: dict[str, Any]) -> Response:
        self.check_key(headers)
        request = parse_request(_json_body(raw_body))
        entry["model"] = request.model
        entry["output"] = "tool" if request.forced_tool else "native" if request.output_schema is not None else "text"
        self.requests_by_model[request.model] += 1
        self._check_model(request)
        try:
            fault = self.faults.next_fault(headers.get(HEADER_SIM_FAULT))
        except FaultSpecError as exc:
            raise invalid(f"{HEADER_SIM_FAULT}: {exc}") from exc
        if fault is not None:
            entry["fault"] = fault.kind.value
            self.faults_served[fault.kind.value] += 1
            if fault.kind is FaultKind.DROP:
                entry["status"] = "dropped"
                return DroppedResponse()
            if fault.kind is FaultKind.SLOW:
                await self._sleep(fault.delay_ms / 1000)
            else:
                raise fault_error(fault)
        body = self._answer(request)
        self.input_tokens_by_model[request.model] += body["usage"]["input_tokens"]
        self.output_tokens_by_model[request.model] += body["usage"]["output_tokens"]
        latency_s = (self.settings.latency_ms
                     + self.settings.latency_per_output_token_ms * body["usage"]["output_tokens"]) / 1000
        if latency_s > 0:
            await self._sleep(latency_s)
        return JSONResponse(body, headers={HEADER_REQUEST_ID: request_id, HEADER_FRONTIER_SIMULATOR: "true"})

    def _answer(self, request: SimRequest) -> dict[str, Any]:
        """The Messages response to a request that passed its checks (realtime and batch alike)."""
        answer = self.responder.answer(request)
        self.answers_by_source[answer.source] += 1
        return build_message(request, answer)

    def _batch_answer(self, request: SimRequest) -> dict[str, Any]:
        """One request of an ended batch: the checks and answer of /v1/messages, without its faults
        and latency (a batch's own faults are its errored and expired results)."""
        self.batch_requests_by_model[request.model] += 1
        self._check_model(request)
        body = self._answer(request)
        self.batch_input_tokens_by_model[request.model] += body["usage"]["input_tokens"]
        self.batch_output_tokens_by_model[request.model] += body["usage"]["output_tokens"]
        return body

    # ---- Message Batches ----------------------------------------------------------------------
    async def create_batch(self, headers: Mapping[str, str], raw_body: bytes, base_url: str) -> Response:
        self.check_key(headers)
        fault = None
        header = headers.get(HEADER_SIM_FAULT)
        if header:
            # Only a request's own header: the queued and random faults are the Messages endpoint's.
            try:
                fault = self.faults.next_fault(header)
            except FaultSpecError as exc:
                raise invalid(f"{HEADER_SIM_FAULT}: {exc}") from exc
        if fault is not None and fault.kind is FaultKind.SLOW:
            await self._sleep(fault.delay_ms / 1000)
        elif fault is not None and fault.kind is not FaultKind.DROP:
            raise fault_error(fault)
        batch = self.batches.create(_json_body(raw_body))
        if fault is not None and fault.kind is FaultKind.DROP:
            # Created, but the client never hears of it: what a crash between create and record looks like.
            return DroppedResponse()
        return self.batch_response(batch_body(batch, time.time(), base_url))

    @staticmethod
    def batch_response(body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, headers={HEADER_REQUEST_ID: f"req_sim_{secrets.token_hex(12)}",
                                           HEADER_FRONTIER_SIMULATOR: "true"})

    def _check_model(self, request: SimRequest) -> None:
        if request.model not in self.models:
            raise ApiError(404, "not_found_error", f"model: {request.model}")
        if request.output_schema is not None and request.model in self._no_native:
            raise invalid(f"output_config.format: structured outputs are not supported by model {request.model}")

    def count_tokens(self, headers: Mapping[str, str], raw_body: bytes) -> dict[str, int]:
        self.check_key(headers)
        body = _json_body(raw_body)
        if isinstance(body, dict):
            body = {**body, "max_tokens": 1}
        request = parse_request(body)
        return {"input_tokens": request.input_tokens}

    def model_info(self, model: str) -> dict[str, Any]:
        return {"type": "model", "id": model, "display_name": f"{model} (simulated)",
                "created_at": SIM_MODEL_CREATED_AT, "lifecycle": "active"}


def _json_body(raw_body: bytes) -> Any:
    try:
        return json.loads(raw_body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise invalid(f"request body is not valid JSON: {exc}") from exc


def fault_error(fault: Fault) -> ApiError:
    headers = {}
    if fault.retry_after_s is not None:
        # Whole seconds as the API sends them; fractions (tests) as a float, which the SDK accepts.
        value = fault.retry_after_s
        headers["retry-after"] = str(int(value)) if value == int(value) else f"{value:g}"
    if fault.kind is FaultKind.BAD_REQUEST:
        return ApiError(400, "invalid_request_error", "messages.0.content: invalid request (simulated)", headers)
    if fault.kind is FaultKind.AUTHENTICATION:
        return ApiError(401, "authentication_error", "invalid x-api-key (simulated)", headers)
    if fault.kind is FaultKind.RATE_LIMIT:
        return ApiError(429, "rate_limit_error", "Number of request tokens has exceeded your per-minute rate "
                        "limit (simulated)", headers)
    if fault.kind is FaultKind.OVERLOADED:
        return ApiError(529, "overloaded_error", "Overloaded (simulated)", headers)
    return ApiError(500, "api_error", "Internal server error (simulated)", headers)


def build_message(request: SimRequest, answer: Answer) -> dict[str, Any]:
    """The Messages API response for `answer`, cut at max_tokens like a real model would be."""
    stop_reason = "end_turn"
    if request.forced_tool is not None:
        tool_input = answer.value if isinstance(answer.value, dict) else {"value": answer.value}
        output_tokens = estimate_tokens(json.dumps(tool_input))
        content: list[dict[str, Any]] = [{"type": "tool_use", "id": f"toolu_sim_{secrets.token_hex(12)}",
                                          "name": request.forced_tool.name, "input": tool_input}]
        stop_reason = "tool_use"
        if output_tokens > request.max_tokens:
            # A tool call cut short carries no usable input; the client must see it was cut.
            output_tokens, stop_reason = request.max_tokens, "max_tokens"
    else:
        verbatim = isinstance(answer.value, str) and (request.output_schema is None or answer.verbatim)
        text = answer.value if verbatim else json.dumps(answer.value)
        output_tokens = estimate_tokens(text)
        if output_tokens > request.max_tokens:
            text = text[: request.max_tokens * CHARS_PER_TOKEN]
            output_tokens, stop_reason = request.max_tokens, "max_tokens"
        content = [{"type": "text", "text": text}]
    return {
        "id": f"msg_sim_{secrets.token_hex(12)}",
        "type": "message",
        "role": "assistant",
        "model": request.model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": request.input_tokens,
            "output_tokens": max(1, output_tokens),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "standard",
        },
    }


def error_response(exc: ApiError, request_id: str | None = None) -> JSONResponse:
    headers = {**exc.headers, HEADER_FRONTIER_SIMULATOR: "true"}
    if request_id:
        headers[HEADER_REQUEST_ID] = request_id
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=headers)


def build_simulator(settings: FrontierSimSettings) -> Simulator:
    """Load the answer sources and model list named by the settings (errors name the file)."""
    if settings.script_path:
        Script.load(settings.script_path)  # fail at start-up, not on the first request
    oracle = Oracle.load(settings.labels_path) if settings.labels_path else None
    models = settings.models or tuple(sorted(load_price_table()))

    def responder() -> Responder:
        # Reloaded on reset, so that a scripted sequence starts over.
        script = Script.load(settings.script_path) if settings.script_path else None
        return Responder(settings.strategy, settings.fixed_answer, script, oracle)

    return Simulator(settings, responder, models)


def create_app(settings: FrontierSimSettings, simulator: Simulator | None = None) -> FastAPI:
    sim = simulator or build_simulator(settings)
    app = FastAPI(title="smallfirst frontier simulator (development only, not the Anthropic API)",
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.simulator = sim

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "api_error")
        return error_response(ApiError(exc.status_code, kind, str(exc.detail)))

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        return await sim.messages(request.headers, await request.body())

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, int]:
        return sim.count_tokens(request.headers, await request.body())

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        sim.check_key(request.headers)
        data = [sim.model_info(m) for m in sim.models]
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        sim.check_key(request.headers)
        if model_id not in sim.models:
            raise ApiError(404, "not_found_error", f"model: {model_id}")
        return sim.model_info(model_id)

    @app.post("/v1/messages/batches")
    async def create_batch(request: Request) -> Response:
        return await sim.create_batch(request.headers, await request.body(), str(request.base_url))

    @app.get("/v1/messages/batches")
    async def list_batches(request: Request, limit: int | None = None, after_id: str | None = None,
                           before_id: str | None = None) -> Response:
        sim.check_key(request.headers)
        listed = sim.batches.list_page(limit, after_id, before_id)
        now, base = time.time(), str(request.base_url)
        return sim.batch_response({"data": [batch_body(b, now, base) for b in listed["page"]],
                                   "has_more": listed["has_more"], "first_id": listed["first_id"],
                                   "last_id": listed["last_id"]})

    @app.get("/v1/messages/batches/{batch_id}")
    async def retrieve_batch(batch_id: str, request: Request) -> Response:
        sim.check_key(request.headers)
        return sim.batch_response(batch_body(sim.batches.get(batch_id), time.time(), str(request.base_url)))

    @app.post("/v1/messages/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> Response:
        sim.check_key(request.headers)
        return sim.batch_response(batch_body(sim.batches.cancel(batch_id), time.time(), str(request.base_url)))

    @app.delete("/v1/messages/batches/{batch_id}")
    async def delete_batch(batch_id: str, request: Request) -> Response:
        sim.check_key(request.headers)
        return sim.batch_response({"id": sim.batches.delete(batch_id), "type": "message_batch_deleted"})

    @app.get("/v1/messages/batches/{batch_id}/results")
    async def batch_results(batch_id: str, request: Request) -> Response:
        sim.check_key(request.headers)
        lines = "".join(json.dumps(result) + "\n" for result in sim.batches.results(batch_id))
        return Response(lines.encode(), media_type="application/binary",
                        headers={HEADER_REQUEST_ID: f"req_sim_{secrets.token_hex(12)}",
                                 HEADER_FRONTIER_SIMULATOR: "true"})

    @app.post("/_sim/batch-outcomes")
    async def force_batch_outcomes(request: Request) -> dict[str, Any]:
        try:
            spec = BatchOutcomesRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise invalid(f"batch outcome request: {exc}") from exc
        return {"forced": sim.batches.outcomes.force(spec.outcomes)}

    @app.get("/_sim/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "simulator": True, "strategy": settings.strategy.value}

    @app.get("/_sim/stats")
    async def stats(log: bool = True) -> dict[str, Any]:
        return sim.stats(include_log=log)

    @app.post("/_sim/faults")
    async def queue_faults(request: Request) -> dict[str, Any]:
        try:
            spec = FaultRequest.model_validate_json(await request.body())
            pending = sim.faults.enqueue(spec.faults)
        except (ValidationError, FaultSpecError) as exc:
            raise invalid(f"fault request: {exc}") from exc
        return {"pending": pending}

    @app.delete("/_sim/faults")
    async def clear_faults() -> dict[str, Any]:
        sim.faults.clear()
        return {"pending": 0}

    @app.post("/_sim/reset")
    async def reset() -> dict[str, Any]:
        sim.reset()
        return {"ok": True}

    return app

"""One error shape everywhere: `{"error": {"code", "message", "details"}}`.

Handlers turn FastAPI's own validation errors, Starlette's 404/405s, Redis outages and unexpected
exceptions into that shape, so a client never has to parse two kinds of error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

JSON_MEDIA_TYPE = "application/json"

# Codes for the statuses Starlette and FastAPI raise by themselves.
_CODES_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(Exception):
    """An error answered with the common shape; raised by the service, rendered by a handler."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details if details is not None else {}
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details if details is not None else {}}}


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(status: int, data: Any, headers: Mapping[str, str] | None = None) -> Response:
    return Response(content=json_bytes(data), status_code=status, media_type=JSON_MEDIA_TYPE,
                    headers=dict(headers or {}))


def error_response(error: ApiError) -> Response:
    return json_response(error.status, error.body(), error.headers)


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as `{"field": "body.input.text", "message", "type"}`."""
    return [
        {
            "field": ".".join(str(part) for part in err.get("loc", ())),
            "message": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in errors
    ]


def validation_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> ApiError:
    errors = [{**err, "loc": (*prefix, *err["loc"])} for err in exc.errors(include_url=False)]
    return ApiError(422, "invalid_request", _summary(errors), field_errors(errors))


def _summary(errors: Sequence[Any]) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:3]]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "invalid request: " + "; ".join(parts) + more


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _request_validation(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    return error_response(ApiError(422, "invalid_request", _summary(errors), field_errors(errors)))


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = _CODES_BY_STATUS.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_"))
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
    return error_response(ApiError(status, code, message, headers=exc.headers))


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.warning("redis unavailable while serving %s %s: %s", request.method, request.url.path, exc)
    return error_response(ApiError(503, "unavailable", "the job store is unavailable; retry shortly",
                                   headers={"Retry-After": "1"}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unexpected error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(ApiError(500, "internal_error", "internal error"))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(redis.RedisError, _redis_error)
    # Starlette hands this one to its outermost middleware: the last resort keeps the shape.
    app.add_exception_handler(Exception, _unexpected)

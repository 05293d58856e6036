"""Request body size limit (413), as pure ASGI middleware.

A declared Content-Length over the limit is refused before a byte of the body is read; a body
without one (chunked) is read up to the limit and refused as soon as it goes over. Bodies within
the limit are handed on unchanged, buffered (the routes read them whole anyway).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from smallfirst.api.errors import error_body, json_bytes

_METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class BodySizeLimit:
    def __init__(self, app: ASGIApp, limit_for_path: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for_path = limit_for_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _METHODS_WITH_BODY:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for_path(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _too_large(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body, the app only waits for the client to go away.
            return await receive()

        await self.app(scope, replay, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _too_large(send: Send, limit: int) -> None:
    body = json_bytes(error_body("payload_too_large", f"request body is larger than {limit} bytes",
                                 {"max_body_bytes": limit}))
    await send({
        "type": "http.response.start",
        "status": 413,
        # The rest of the body is not read: the connection cannot be reused.
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})

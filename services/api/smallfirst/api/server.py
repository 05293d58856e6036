"""The HTTP server's own limits, below the ASGI app: a request whose head (request line and
headers) exceeds `max_header_bytes` is answered 431 in the API's error shape and its connection
closed, before the rest of it is read.

uvicorn's httptools protocol has no bound on the head: httptools gathers a header's value across
reads before handing it over, so a 20 MiB header would be held whole before any middleware could
look at it. The bound is therefore counted on the bytes received while a request's head is
incomplete (at most one read beyond the limit is held). With the h11 protocol (no httptools),
uvicorn's `h11_max_incomplete_event_size` gives the same bound, answered as uvicorn's plain 400.
"""

from __future__ import annotations

import functools
from typing import Any

from smallfirst.api.errors import error_body, json_bytes

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools not installed: uvicorn falls back to h11
    HttpToolsProtocol = None  # type: ignore[assignment, misc]


def _too_large_response(limit: int) -> bytes:
    body = json_bytes(error_body("request_header_fields_too_large",
                                 f"the request line and headers are larger than {limit} bytes",
                                 {"max_header_bytes": limit}))
    return (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


@functools.cache
def configured_max_header_bytes() -> int:
    """From the environment, once per process (each uvicorn worker process reads its own)."""
    from smallfirst.api.settings import ApiSettings

    return ApiSettings().max_header_bytes


if HttpToolsProtocol is not None:
    class BoundedHeadProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with the head bound (`SMALLFIRST_MAX_HEADER_BYTES`)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._max_head_bytes = configured_max_header_bytes()
            self._awaiting_head = True
            self._head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._awaiting_head = True
            self._head_bytes = 0

        def on_headers_complete(self) -> None:
            self._awaiting_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self._awaiting_head or self.transport.is_closing():
                return
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head_bytes:
                self.transport.write(_too_large_response(self._max_head_bytes))
                self.transport.close()


def server_options(max_header_bytes: int) -> dict[str, Any]:
    """uvicorn.run keyword arguments that bound a request's head. The protocol goes by import
    path, so that uvicorn's worker processes (spawned) import it themselves."""
    options: dict[str, Any] = {"h11_max_incomplete_event_size": max_header_bytes}
    if HttpToolsProtocol is not None:
        options["http"] = "smallfirst.api.server:BoundedHeadProtocol"
    return options

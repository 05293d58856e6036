"""A TCP proxy in front of a real server that misbehaves on purpose, a set number of times:

- `drop_after_forwarding`: the next N connections forward the client's request to the server, wait
  until the server has begun to answer (so it did handle the request), then close the client's
  connection without passing the answer on: the client sees a dropped connection after its
  request took effect.
- `answer_503`: the next N connections are answered `503` with `Retry-After: 0` by the proxy itself.

Every other connection is passed through both ways unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field

_BUFFER = 65536
_OVERLOADED_BODY = b'{"error": {"code": "unavailable", "message": "the proxy says: busy", "details": {}}}'
_OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(_OVERLOADED_BODY)).encode() + b"\r\nConnection: close\r\n\r\n"
               + _OVERLOADED_BODY)


@dataclass
class FaultyProxy:
    upstream_host: str
    upstream_port: int
    drop_after_forwarding: int = 0
    answer_503: int = 0
    connections: int = 0
    dropped: int = 0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _listener: socket.socket | None = None

    def start(self) -> FaultyProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._listener is not None
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode = "pass"
                if self.answer_503 > 0:
                    self.answer_503 -= 1
                    mode = "503"
                elif self.drop_after_forwarding > 0:
                    self.drop_after_forwarding -= 1
                    mode = "drop"
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        if mode == "503":
            try:
                _read_request(client)
                client.sendall(_OVERLOADED)
            finally:
                client.close()
            with self._lock:
                self.refused += 1
            return
        upstream = socket.create_connection((self.upstream_host, self.upstream_port))
        if mode == "drop":
            try:
                upstream.sendall(_read_request(client))
                upstream.recv(_BUFFER)  # the server has answered: the request took effect
            finally:
                # RST rather than FIN, as a dropped connection looks to the client.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                upstream.close()
            with self._lock:
                self.dropped += 1
            return
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _read_request(sock: socket.socket) -> bytes:
    """One HTTP/1.1 request with a Content-Length body (what httpx sends)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(_BUFFER)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(_BUFFER)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _pipe(source: socket.socket, target: socket.socket) -> None:
    try:
        while True:
            chunk = source.recv(_BUFFER)
            if not chunk:
                break
            target.sendall(chunk)
    except OSError:
        pass
    finally:
        for sock in (source, target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

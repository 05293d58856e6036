"""A real OTLP trace receiver for tests: OTLP/HTTP (protobuf) and OTLP/gRPC on free local ports.

It decodes each `ExportTraceServiceRequest` with the protobuf classes of `opentelemetry-proto` (the
ones the exporters encode with) and keeps the spans for assertions. Nothing about the exporters is
faked: the services under test export over the network exactly as they would to a collector.

As a process of its own (a stand-in collector for benchmarks, counting spans without keeping them):

    python -m tests.support.otlp_receiver

prints `{"http_endpoint": ..., "grpc_endpoint": ...}` once listening, and on SIGTERM or SIGINT a last
line `{"spans": N, "requests": N, "rejected": N}`.
"""

from __future__ import annotations

import gzip
import json
import signal
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from tests.support.procs import free_port

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    name: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT, SPAN_KIND_PRODUCER, ...
    service_name: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: str = "STATUS_CODE_UNSET"
    protocol: str = "http"  # which endpoint received it


def _any_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _any_value(pair.value) for pair in pairs if isinstance(pair, KeyValue)}


def decode_spans(request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> list[ReceivedSpan]:
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    spans = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    kind=Span.SpanKind.Name(span.kind),
                    service_name=str(resource.get("service.name", "")),
                    attributes=_attributes(span.attributes),
                    status_code=Status.StatusCode.Name(span.status.code),
                    protocol=protocol,
                ))
    return spans


def count_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        self.receiver.receive(request, "grpc")
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self, keep_spans: bool = True) -> None:
        """`keep_spans=False` only counts them (`span_count`): a cheap sink for benchmarks."""
        self.keep_spans = keep_spans
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Condition()
        self.requests = 0
        self.span_count = 0
        self.rejected: list[str] = []
        self._http: ThreadingHTTPServer | None = None
        self._grpc: grpc.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    # ---- lifecycle ----
    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = self.headers.get("Content-Encoding", "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                content_type = self.headers.get("Content-Type", "")
                if self.path != TRACES_PATH or not content_type.startswith("application/x-protobuf"):
                    receiver.rejected.append(f"{self.path} {content_type}")
                    self.send_error(404 if self.path != TRACES_PATH else 415)
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.receive(request, "http")
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http_port = free_port()
        self._http = ThreadingHTTPServer(("127.0.0.1", self.http_port), Handler)
        threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)

    # ---- where to export ----
    @property
    def http_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def env(self, protocol: str = "http/protobuf") -> dict[str, str]:
        """OTEL_* variables that make a process export its spans here, promptly."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.grpc_endpoint if protocol == "grpc" else self.http_endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }

    # ---- what arrived ----
    def receive(self, request: trace_service_pb2.ExportTraceServiceRequest, protocol: str) -> None:
        if self.keep_spans:
            self.add(decode_spans(request, protocol))
            return
        with self._lock:
            self.requests += 1
            self.span_count += count_spans(request)

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.requests += 1
            self.span_count += len(spans)
            self._spans.extend(spans)
            self._lock.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()

    def wait_for(self, condition: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0,
                 what: str = "spans") -> list[ReceivedSpan]:
        """Wait until `condition(spans)` holds; returns the spans then, or raises TimeoutError
        listing what did arrive."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not condition(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({f"{s.service_name}:{s.name}" for s in self._spans})
                    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}; received {names}")
                self._lock.wait(min(left, 0.5))
            return list(self._spans)

    def named(self, name: str) -> list[ReceivedSpan]:
        return [s for s in self.spans() if s.name == name]


def main() -> None:
    receiver = OtlpReceiver(keep_spans=False).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(json.dumps({"http_endpoint": receiver.http_endpoint, "grpc_endpoint": receiver.grpc_endpoint}), flush=True)
    while not stop.wait(0.5):
        pass
    receiver.stop()
    print(json.dumps({"spans": receiver.span_count, "requests": receiver.requests,
                      "rejected": len(receiver.rejected)}), flush=True)


if __name__ == "__main__":
    main()

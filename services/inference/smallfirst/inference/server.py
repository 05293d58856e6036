"""The inference server process: engine, gRPC server (service, health, reflection), metrics, shutdown.

Life of a server:
1. The engine starts and answers one warm-up request; only then does the gRPC port open and
   health report SERVING, so a replica never receives calls it cannot serve yet.
2. SIGTERM (or SIGINT): health turns NOT_SERVING at once (clients that watch health, and load
   balancers, stop sending), new calls get UNAVAILABLE, calls in flight get `drain_grace_s` to
   finish; whatever is left is then cancelled (aborting its engine requests) and the engine stops.
3. If the engine dies, the server stops at once and the process exits non-zero, so that its
   supervisor (Kubernetes) restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from smallfirst.common import constants, telemetry
from smallfirst.common.constants import SERVICE_INFERENCE
from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from smallfirst.inference.engine import VllmEngine
from smallfirst.inference.metrics import InferenceMetrics
from smallfirst.inference.servicer import Admission, InferenceServicer
from smallfirst.inference.settings import InferenceSettings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
# Cancelled calls need a moment to unwind (and abort their engine requests) before the engine stops.
_CANCEL_GRACE_S = 1.0


def grpc_server_options(settings: InferenceSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Clients keep idle connections alive with pings; allow them at the rate they send
        # (constants.GRPC_KEEPALIVE_TIME_MS) or the server answers GOAWAY too_many_pings.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", constants.GRPC_SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 0),
        # The server pings too, so the calls of a client that vanished are cancelled (and their
        # engine requests aborted) instead of generating for nobody.
        ("grpc.keepalive_time_ms", 2 * constants.GRPC_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", constants.GRPC_KEEPALIVE_TIMEOUT_MS),
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        # Two servers on one port would split the calls silently; fail to bind instead.
        ("grpc.so_reuseport", 0),
    ]


def server_credentials(settings: InferenceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mutual TLS with a client CA); None: plaintext."""
    if not settings.tls_cert_file or not settings.tls_key_file:
        return None
    chain = Path(settings.tls_cert_file).read_bytes()
    key = Path(settings.tls_key_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


class InferenceServer:
    """Built by `build_server`; `serve()` runs until SIGTERM and returns the exit code."""

    def __init__(self, settings: InferenceSettings) -> None:
        self.settings = settings
        self.bound_port: int | None = None
        self._stop = asyncio.Event()
        self._engine_dead = False

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # Tracing is on only when the OTEL_* variables say so; off, nothing is installed.
        telemetry.configure_telemetry(SERVICE_INFERENCE)

        log.info("starting the engine for %s (%s)", settings.model_name, settings.model_path)
        engine = VllmEngine.start(settings)
        try:
            await engine.warm_up()
            if self._stop.is_set():
                return 0
            return await self._serve_with(engine)
        finally:
            engine.shutdown()
            log.info("engine stopped")

    async def _serve_with(self, engine: VllmEngine) -> int:
        settings = self.settings
        metrics = InferenceMetrics(settings.model_name)
        metrics.include_global_registry()
        metrics.watch_engine(engine.unfinished_requests)
        if settings.metrics_port:
            metrics.serve(settings.metrics_port)

        admission = Admission()
        health = HealthServicer()
        server = grpc.aio.server(
            interceptors=telemetry.grpc_server_interceptors(),
            options=grpc_server_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_requests,
        )
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine, admission, metrics), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if settings.reflection:
            reflection.enable_server_reflection((SERVICE_NAME,
                                                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                                 reflection.SERVICE_NAME), server)
        address = f"{settings.host}:{settings.port}"
        credentials = server_credentials(settings)
        self.bound_port = (server.add_secure_port(address, credentials) if credentials is not None
                           else server.add_insecure_port(address))
        await server.start()
        await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s (%s) on port %s", settings.model_name, engine.kind.value, self.bound_port)

        watchdog = asyncio.create_task(self._watch_engine(engine))
        try:
            await self._stop.wait()
            await self._drain(server, health, admission, metrics)
        finally:
            watchdog.cancel()
            metrics.close()
        return 1 if self._engine_dead else 0

    async def _watch_engine(self, engine: VllmEngine) -> None:
        while not self._stop.is_set():
            if engine.errored:
                log.error("the engine died; stopping so the supervisor restarts this server")
                self._engine_dead = True
                self._stop.set()
                return
            await asyncio.sleep(self.settings.engine_check_interval_s)

    async def _drain(self, server: grpc.aio.Server, health: HealthServicer, admission: Admission,
                     metrics: InferenceMetrics) -> None:
        admission.accepting = False
        metrics.draining.labels(metrics.model).set(1)
        await health.enter_graceful_shutdown()
        grace_s = 0.0 if self._engine_dead else self.settings.drain_grace_s
        log.info("draining %d call(s) in flight (grace %.1f s)", admission.in_flight, grace_s)
        if not await admission.wait_idle(grace_s):
            log.warning("%d call(s) still in flight after the grace period; cancelling them", admission.in_flight)
        await server.stop(_CANCEL_GRACE_S)
        log.info("gRPC server stopped")


def build_server(settings: InferenceSettings) -> InferenceServer:
    return InferenceServer(settings)

"""A receiver that answers a byte every few seconds holds a few threads of the webhooks pool and
nothing else: another tenant's callback and a frontier job go through while it drips, and each of
its deliveries ends at the delivery's deadline and is tried again on the retry schedule."""

from __future__ import annotations

import itertools
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.delivery import BACKOFF_S
from smallfirst.common.jobs import ErrorInfo, Job, JobStatus, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry
from tests.frontier_fixtures import SimControl
from tests.support.procs import ManagedProcess, free_port, wait_until

DEADLINE_S = 6.0
DRIP_INTERVAL_S = 2.0
MAX_PER_HOST = 2
SLOW_JOBS = 3
# A full answer that would take a minute at one byte per DRIP_INTERVAL_S.
DRIPPED_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


@dataclass
class Connection:
    opened_at: float
    msg_id: str = ""
    closed_at: float | None = None
    bytes_sent: int = 0
    closed_by_client: bool = False


@dataclass
class SlowReceiver:
    """A raw TCP receiver: reads the request, then drips its answer one byte per DRIP_INTERVAL_S."""

    port: int
    connections: list[Connection] = field(default_factory=list)
    in_flight: int = 0
    most_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        record = Connection(opened_at=time.monotonic())
        with self.lock:
            self.connections.append(record)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            request = read_request(conn)
            found = re.search(rb"webhook-id: (\S+)", request, re.IGNORECASE)
            record.msg_id = found.group(1).decode() if found else ""
            for byte in DRIPPED_ANSWER:
                conn.sendall(bytes([byte]))
                record.bytes_sent += 1
                if hung_up_within(conn, DRIP_INTERVAL_S):
                    record.closed_by_client = True
                    return
        except OSError:
            record.closed_by_client = True
        finally:
            record.closed_at = time.monotonic()
            with self.lock:
                self.in_flight -= 1
            conn.close()


def read_request(conn: socket.socket) -> bytes:
    """The whole request: its headers and content-length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    while found and len(body) < int(found.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


def hung_up_within(conn: socket.socket, wait_s: float) -> bool:
    """Waits `wait_s`; True as soon as the client closes its end."""
    until = time.monotonic() + wait_s
    while (left := until - time.monotonic()) > 0:
        conn.settimeout(left)
        try:
            if conn.recv(1024) == b"":
                return True
        except TimeoutError:
            return False
    return False


@pytest.fixture
def slow_receiver() -> Iterator[SlowReceiver]:
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = SlowReceiver(port=listener.getsockname()[1])
    threading.Thread(target=receiver.serve, args=(listener,), daemon=True).start()
    yield receiver
    listener.close()


@dataclass
class FastReceiver:
    url: str
    received: dict[str, float] = field(default_factory=dict)


@pytest.fixture
def fast_receiver() -> Iterator[FastReceiver]:
    received: dict[str, float] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            received[self.headers["webhook-id"]] = time.monotonic()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # Another host name than the slow receiver's: the per-host cap is per name.
    yield FastReceiver(url=f"http://localhost:{server.server_address[1]}/hook", received=received)
    server.shutdown()


def ended_job(store: JobStore, tenant: str, callback_url: str) -> Job:
    """A job of `tenant` that failed; ending it put its callback in the outbox."""
    now = time.time()
    job = Job(id=new_job_id(), tenant=tenant, task="banking77_intent", input={"text": "where is my card"},
              route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT), created_at=now, updated_at=now,
              queued_at=now, callback_url=callback_url)
    store.create(job)
    _, running = store.transition(job.id, lambda j: lifecycle.begin_attempt(
        j, tier=Tier.SMALL, model="m", worker="w", task_id="d1", now=now, lease_s=60))
    store.transition(job.id, lambda j: lifecycle.fail(j, lifecycle.AttemptEnd(
        attempt_number=running.attempts[-1].number, task_id="d1", now=time.time()),
        error=ErrorInfo(code="validation_failed", message="no")))
    return job


def frontier_job(store: JobStore, tenant: str) -> Job:
    now = time.time()
    job = Job(id=new_job_id(), tenant=tenant, task="banking77_intent", input={"text": "my card has not arrived"},
              route=RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.TASK_DEFAULT), created_at=now,
              updated_at=now, queued_at=now)
    store.create(job)
    return job


@pytest.fixture
def pools(redis_url: str, catalog_path: Path, logs_dir: Path, tmp_path: Path,
          frontier_sim: SimControl) -> Iterator[tuple[ManagedProcess, ManagedProcess]]:
    """A webhooks pool (4 threads, at most MAX_PER_HOST deliveries per host, DEADLINE_S each) and a
    frontier pool on the simulator, both up."""
    heartbeats = tmp_path / "heartbeats"
    env = {
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(catalog_path),
        "SMALLFIRST_HEARTBEAT_DIR": str(heartbeats),
        "SMALLFIRST_ALLOW_PRIVATE_CALLBACKS": "true",
        "SMALLFIRST_WEBHOOK_TIMEOUT_S": str(DEADLINE_S),
        "SMALLFIRST_WEBHOOK_MAX_PER_HOST": str(MAX_PER_HOST),
        "SMALLFIRST_FRONTIER_BASE_URL": frontier_sim.url,
        "SMALLFIRST_METRICS_PORT": "0",
    }
    cli = [sys.executable, "-m", "smallfirst.cli", "worker"]
    webhooks = ManagedProcess(f"webhooks-worker-{free_port()}",
                              [*cli, "--pool", k.POOL_WEBHOOKS, "--concurrency", "4", "--hostname", "wh@%h"],
                              logs_dir, env=env).start()
    frontier = ManagedProcess(f"frontier-worker-{free_port()}",
                              [*cli, "--pool", k.POOL_FRONTIER, "--concurrency", "2", "--hostname", "fr@%h"],
                              logs_dir, env=env).start()
    try:
        for pool, process in ((k.POOL_WEBHOOKS, webhooks), (k.POOL_FRONTIER, frontier)):
            beat = heartbeats / f"smallfirst-worker-{pool}.heartbeat"
            process.wait_ready(lambda beat=beat: beat.exists(), timeout_s=90)  # type: ignore[misc]
        yield webhooks, frontier
    finally:
        webhooks.stop()
        frontier.stop()


def test_slow_drip_receiver_delays_no_other_tenant_and_no_job_and_each_try_ends_at_its_deadline(
        redis_url: str, catalog_path: Path, slow_receiver: SlowReceiver, fast_receiver: FastReceiver,
        pools: tuple[ManagedProcess, ManagedProcess]) -> None:
    # given: three callbacks of tenant "slow" to the dripping receiver, one of tenant "fast"
    # elsewhere, and a frontier job, all published at once
    client = redis.Redis.from_url(redis_url)
    store = JobStore(client, retention_s=3600, stale_after_s=600)
    tenants = TenantRegistry(client)
    tenants.create("slow", tenant_id="slow", allow_private_callbacks=True)
    tenants.create("fast", tenant_id="fast", allow_private_callbacks=True)
    slow_jobs = [ended_job(store, "slow", f"http://127.0.0.1:{slow_receiver.port}/hook") for _ in range(SLOW_JOBS)]
    fast = ended_job(store, "fast", fast_receiver.url)
    job = frontier_job(store, "fast")
    publisher = Publisher(make_celery(CoreSettings.model_validate({"redis_url": redis_url,
                                                                   "catalog_path": catalog_path})))

    # when
    for slow in slow_jobs:
        publisher.publish_webhook(slow.id)
    wait_until(lambda: len(slow_receiver.connections) >= MAX_PER_HOST, 30, "the slow receiver to be called")
    publisher.publish_webhook(fast.id)
    publisher.publish_job(job)
    wait_until(lambda: f"msg_{fast.id}" in fast_receiver.received, 30, "the other tenant's callback")
    wait_until(lambda: store.get(job.id).status.terminal, 60, "the frontier job to end")
    job_ended_at = time.monotonic()
    first_tries_ended = [c.closed_at for c in slow_receiver.connections[:MAX_PER_HOST]]
    wait_until(lambda: len(slow_receiver.connections) >= MAX_PER_HOST + 1 and all(
        c.closed_at is not None for c in slow_receiver.connections[:MAX_PER_HOST + 1]), 60,
        "the slow receiver's tries to end")

    # then: the other tenant's callback and the job went through while the first tries still dripped
    assert first_tries_ended == [None] * MAX_PER_HOST, (slow_receiver.connections, job_ended_at)
    assert fast_receiver.received[f"msg_{fast.id}"] < job_ended_at
    assert store.get(job.id).status is JobStatus.SUCCEEDED
    # and: never more than the cap on one host at once; each try ended by the sender, long before
    # the receiver finished its answer (the deadline, not a per-read timeout, cut it)
    assert slow_receiver.most_in_flight <= MAX_PER_HOST
    first = slow_receiver.connections[0]
    assert first.closed_by_client
    assert first.bytes_sent < len(DRIPPED_ANSWER)
    records = [client.hgetall(k.webhook_delivery_key(slow.id)) for slow in slow_jobs]
    tried = [r for r in records if r]
    assert tried, "no slow delivery recorded a try"
    for record in tried:
        assert record[b"last_status"] == b"0"
        assert f"{DEADLINE_S:g} s deadline".encode() in record[b"last_detail"]
    # and: the retry schedule holds: a callback's second try comes no sooner than the first backoff
    # after its first try ended
    wait_until(lambda: any(len(tries_of(slow_receiver, s.id)) >= 2 for s in slow_jobs), 90,
               "a slow callback's second try")
    for slow in slow_jobs:
        tries = tries_of(slow_receiver, slow.id)
        for earlier, later in itertools.pairwise(tries):
            assert earlier.closed_at is not None
            assert later.opened_at - earlier.closed_at >= BACKOFF_S[0] - DRIP_INTERVAL_S
    # the receiver sees the hang-up at its next drip at the latest
    assert all(c.closed_at - c.opened_at < DEADLINE_S + 2 * DRIP_INTERVAL_S
               for c in slow_receiver.connections if c.closed_at is not None)


def tries_of(receiver: SlowReceiver, job_id: str) -> list[Connection]:
    with receiver.lock:
        return [c for c in receiver.connections if c.msg_id == f"msg_{job_id}"]

"""The whole stack as separate processes: Redis, inference servers (real vLLM), the frontier
simulator, the API, and the three worker pools, started once for the module that asks for it."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import redis
import yaml

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.inference_fixtures import InferenceServerHandle
from tests.support.procs import require_binary

INVOICE_TEXT = (
    "INVOICE INV-2041\nAcme Tools Ltd, 12 Harbour Road, Bristol\nIssue date: 2026-11-02\n"
    "Due date: 2026-12-01\n3 x torque wrench  1,250.00\nTotal due: EUR 1,250.00"
)
INVOICE_ANSWER = {"invoice_number": "INV-2041", "vendor": "Acme Tools Ltd", "issue_date": "2026-11-02",
                  "due_date": "2026-12-01", "currency": "EUR", "total_amount": "1,250.00"}
# Job leases short enough that the sweeper takes over a dead worker's job within the test.
JOB_LEASE_S = 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, embedding_server_session: InferenceServerHandle,
          generator_server_session: InferenceServerHandle) -> Iterator[Stack]:
    require_binary("redis-server")
    workdir = tmp_path_factory.mktemp("stack")
    script = workdir / "frontier-script.yaml"
    script.write_text(yaml.safe_dump({"rules": [{"match": "INV-2041", "answer": INVOICE_ANSWER}]}))
    config = StackConfig(
        workdir=workdir, catalog_path=default_catalog_path(),
        frontier_sim_args=["--strategy", "scripted", "--script", str(script)],
        small_concurrency=8, frontier_concurrency=4, job_lease_s=JOB_LEASE_S, sweep_interval_s=1.0,
        inference_ports={"embed": embedding_server_session.port, "generate": generator_server_session.port},
    )
    running = Stack(config)
    try:
        running.start_all()
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="module")
def tenants(stack: Stack) -> TenantRegistry:
    return TenantRegistry(redis.Redis.from_url(stack.redis_url))


@pytest.fixture
def tenant(tenants: TenantRegistry) -> IssuedTenant:
    return tenants.create(f"acme-{time.monotonic_ns()}")


@pytest.fixture
def client(stack: Stack, tenant: IssuedTenant) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                      timeout=90) as http:
        yield http


@pytest.fixture
def frontier_sim(stack: Stack) -> Iterator[httpx.Client]:
    """Admin access to the simulator: queue faults, read what it received."""
    assert stack.frontier_base_url is not None
    with httpx.Client(base_url=stack.frontier_base_url, timeout=10) as http:
        yield http
        http.delete("/_sim/faults")


def submit_and_wait(client: httpx.Client, body: dict[str, Any], wait_s: int = 60) -> dict[str, Any]:
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    return wait_for_end(client, created.json()["id"], wait_s)


def wait_for_end(client: httpx.Client, job_id: str, wait_s: int = 60) -> dict[str, Any]:
    deadline = time.monotonic() + wait_s * 3
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": wait_s}).json()
        if job["status"] in {"succeeded", "failed", "cancelled"} or time.monotonic() > deadline:
            return job
        # A long-poll returns early only when the job ends, or after its full wait.


def wait_for_status(client: httpx.Client, job_id: str, status: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == status:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {status}: {job}")


@dataclass
class ReceivedCallback:
    headers: dict[str, str]
    body: bytes


@dataclass
class WebhookReceiver:
    url: str
    received: list[ReceivedCallback] = field(default_factory=list)
    fail_first: int = 0
    event: threading.Event = field(default_factory=threading.Event)

    def wait(self, count: int, timeout_s: float = 60) -> list[ReceivedCallback]:
        deadline = time.monotonic() + timeout_s
        while len(self.received) < count and time.monotonic() < deadline:
            self.event.wait(0.2)
        return self.received


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """A real HTTP server on loopback that records callbacks (and can refuse the first few)."""
    state: dict[str, WebhookReceiver] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = state["r"]
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if receiver.fail_first > 0:
                receiver.fail_first -= 1
                self.send_response(503)
                self.end_headers()
                return
            receiver.received.append(ReceivedCallback({kk.lower(): v for kk, v in self.headers.items()}, body))
            receiver.event.set()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state["r"] = WebhookReceiver(url=f"http://127.0.0.1:{server.server_address[1]}/hooks/smallfirst")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state["r"]
    server.shutdown()


def sim_requests(frontier_sim: httpx.Client) -> int:
    stats: dict[str, Any] = frontier_sim.get("/_sim/stats").json()
    return int(stats.get("requests_total", sum(stats.get("requests_by_model", {}).values())))


def queue_depth(stack: Stack, queue: str) -> int:
    client = redis.Redis.from_url(stack.redis_url)
    return sum(int(client.llen(key)) for key in k.priority_list_keys(queue))


def dump(job: dict[str, Any]) -> str:
    return json.dumps(job, indent=1)[:3000]

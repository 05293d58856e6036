"""Cancel reaches a frontier call in flight: the call's connection is cut (the server sees it closed),
the call is not retried, and the worker's thread is free for the next job at once. The real
`anthropic` SDK, a real socket server, real Redis; the end-to-end case runs the API, a frontier pool
and the frontier simulator as processes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
import redis

from smallfirst.cli.job_stream import FRONTIER_JOB
from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.tenants import TenantRegistry
from smallfirst.frontier_worker.cancellation import CancelWatcher, ThreadClients
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer


@pytest.fixture
def silent_server() -> Iterator[tuple[str, threading.Event]]:
    """An HTTP server that reads a request and never answers; the event is set when the client's
    side of a connection is closed (the server reads end-of-file)."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed_by_client = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while conn.recv(65536):
                pass
            closed_by_client.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", closed_by_client
    listener.close()


def test_aborted_transport_cuts_a_call_waiting_for_its_answer(silent_server: tuple[str, threading.Event]) -> None:
    # given: an SDK call, on this thread's abortable client, waiting for an answer that never comes
    url, closed_by_client = silent_server
    clients = ThreadClients(anthropic.Anthropic(api_key="test", base_url=url, max_retries=0, timeout=120))
    outcome: list[BaseException] = []
    transports = []

    def call() -> None:
        client, transport = clients.current()
        transports.append(transport)
        try:
            client.messages.create(model="claude-haiku-5-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        except anthropic.APIError as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_until(lambda: bool(transports) and bool(transports[0].backend.streams), 30, "the call to connect")

    # when: its transport is aborted from another thread
    assert transports[0].abort() == 1

    # then: the call fails with a connection error (not after its 120 s timeout), and the server
    # saw the connection closed
    caller.join(timeout=30)
    assert not caller.is_alive()
    assert isinstance(outcome[0], anthropic.APIConnectionError)
    assert closed_by_client.wait(timeout=10)


def test_watcher_sets_the_cancel_flag_of_a_cancelled_job_only(redis_url: str) -> None:
    # given: two jobs watched, one of which is cancelled
    client = redis.Redis.from_url(redis_url)
    client.set(k.job_key("j-cancelled"), '{"status": "cancelled"}')
    client.set(k.job_key("j-running"), '{"status": "running"}')
    watcher = CancelWatcher(client, poll_interval_s=60)
    with watcher.watch("j-cancelled") as cancelled, watcher.watch("j-running") as running:
        # when: the watcher looks
        aborted = watcher.check_once()
        # then
        assert aborted == 1
        assert cancelled is not None
        assert cancelled.is_set()
        assert running is not None
        assert not running.is_set()


@pytest.mark.e2e
def test_cancel_during_a_slow_frontier_call_frees_the_worker_for_the_next_job(
        tmp_path: Path, catalog_path: Path) -> None:
    # given: a frontier pool of one thread, whose next frontier call takes 90 s
    server = RedisServer(tmp_path / "redis").start()
    stack = Stack(StackConfig(workdir=tmp_path / "stack", catalog_path=catalog_path, redis_url=server.url,
                              frontier_concurrency=1))
    try:
        stack.start_frontier_sim()
        stack.start_api()
        stack.start_worker(k.POOL_FRONTIER)
        assert stack.frontier_base_url is not None
        httpx.post(f"{stack.frontier_base_url}/_sim/faults",
                   json={"faults": [{"kind": "slow", "delay_ms": 90_000}]}).raise_for_status()
        tenant = TenantRegistry(redis.Redis.from_url(server.url)).create("cancel")
        with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                          timeout=60) as api:
            slow_id = api.post("/v1/jobs", json=FRONTIER_JOB).json()["id"]
            wait_until(lambda: api.get(f"/v1/jobs/{slow_id}").json()["status"] == "running", 60,
                       "the slow job to run")

            # when: it is cancelled, and another job follows
            assert api.post(f"/v1/jobs/{slow_id}/cancel").status_code == 200
            next_id = api.post("/v1/jobs", json=FRONTIER_JOB).json()["id"]

            # then: the next job is answered while the slow call would still be running (the one
            # thread was freed), and the cancelled job stays cancelled, its attempt unbilled
            following = api.get(f"/v1/jobs/{next_id}", params={"wait": 30}).json()
            assert following["status"] == "succeeded", following
            cancelled = api.get(f"/v1/jobs/{slow_id}").json()
            assert cancelled["status"] == "cancelled"
            assert cancelled["result"] is None
            assert [a["billed"] for a in cancelled["attempts"]] == [False]
            assert cancelled["cost_usd"] == 0
    finally:
        stack.stop_all()
        server.stop()

"""Retention: after jobs ran through the real API and worker processes (frontier and webhooks pools,
the frontier simulator, Redis), every key in Redis has a TTL unless `constants.KEYS_WITHOUT_TTL`
names it with a reason; idempotency records hold what a replay needs, not the response."""

from __future__ import annotations

import fnmatch
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import TenantRegistry
from tests.support.procs import require_binary

EMAIL = {"task": "email_summary", "input": {"text": "Hello, can we move our call to Tuesday? Kim"}}
TENANT_RETENTION_S = 600
TENANT_IDEMPOTENCY_TTL_S = 300


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis, the frontier simulator, the API and the frontier and webhooks pools (no inference)."""
    require_binary("redis-server")
    running = Stack(StackConfig(workdir=tmp_path_factory.mktemp("retention"), catalog_path=default_catalog_path(),
                                frontier_concurrency=4, webhook_concurrency=2, sweep_interval_s=1.0))
    try:
        running.start_redis()
        running.start_frontier_sim()
        running.start_api()
        running.start_worker(k.POOL_FRONTIER)
        running.start_worker(k.POOL_WEBHOOKS)
        yield running
    finally:
        running.stop_all()


@pytest.fixture
def callback_url() -> Iterator[str]:
    """A receiver on 127.0.0.1 that answers every callback 204."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


def wait_ended(client: httpx.Client, job_id: str, timeout_s: float = 90) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
        if job["status"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            return job


def keys_without_ttl(client: redis.Redis) -> dict[str, str]:
    """Every key without a TTL, with its type."""
    found: dict[str, str] = {}
    for raw in client.scan_iter(count=1000):
        key = raw.decode("utf-8", "backslashreplace")
        if client.ttl(raw) == -1:
            found[key] = client.type(raw).decode()
    return found


def test_after_jobs_ran_every_key_has_a_ttl_or_a_documented_reason(stack: Stack, callback_url: str) -> None:
    # given a tenant with its own retention, budget and idempotency TTL
    client = redis.Redis.from_url(stack.redis_url)
    issued = TenantRegistry(client).create("acme", limits={
        "retention_s": TENANT_RETENTION_S, "idempotency_ttl_s": TENANT_IDEMPOTENCY_TTL_S, "budget_daily_usd": 100.0})

    # when it submits jobs (one with an Idempotency-Key and repeated, a batch, one with a callback),
    # cancels one, and they run through the frontier and webhooks pools
    with httpx.Client(base_url=stack.api_url, headers={"Authorization": f"Bearer {issued.api_key}"},
                      timeout=30) as api:
        keyed = api.post("/v1/jobs", json=EMAIL, headers={k.HEADER_IDEMPOTENCY_KEY: "order-1"})
        repeat = api.post("/v1/jobs", json=EMAIL, headers={k.HEADER_IDEMPOTENCY_KEY: "order-1"})
        batch = api.post("/v1/jobs/batch", json={"jobs": [EMAIL] * 3}).json()
        called = api.post("/v1/jobs", json={**EMAIL, "callback_url": callback_url}).json()
        cancelled = api.post("/v1/jobs", json={**EMAIL, "priority": "low"}).json()
        api.post(f"/v1/jobs/{cancelled['id']}/cancel")
        ids = [keyed.json()["id"], *(item["job"]["id"] for item in batch["results"]), called["id"]]
        ended = [wait_ended(api, job_id) for job_id in ids]
        stats = api.get("/v1/stats").json()
        api.get("/v1/jobs")
    deadline = time.monotonic() + 60
    while client.zscore(k.WEBHOOK_OUTBOX_KEY, called["id"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)

    # then the jobs ended, the repeat was a replay of the first response
    assert [job["status"] for job in ended] == ["succeeded"] * len(ids), json.dumps(ended)[:2000]
    assert repeat.json()["id"] == keyed.json()["id"]
    assert repeat.headers.get("Idempotent-Replayed") == "true"
    assert stats["budget"]["day"]["spent_usd"] > 0
    # and every key without a TTL is one the constants name with a reason
    undocumented = {key: kind for key, kind in keys_without_ttl(client).items()
                    if not any(fnmatch.fnmatchcase(key, pattern) for pattern in k.KEYS_WITHOUT_TTL)}
    assert undocumented == {}
    # and the tenant's records expire on its own schedule
    assert 0 < client.ttl(k.job_key(ids[0])) <= TENANT_RETENTION_S
    assert 0 < client.ttl(k.tenant_jobs_key(issued.tenant.id)) <= TENANT_RETENTION_S
    assert 0 < client.ttl(k.webhook_delivery_key(called["id"])) <= 7 * 24 * 3600
    idempotency = client.get(k.idempotency_key(issued.tenant.id, "order-1"))
    assert idempotency is not None
    assert 0 < client.ttl(k.idempotency_key(issued.tenant.id, "order-1")) <= TENANT_IDEMPOTENCY_TTL_S
    # and the idempotency record holds the job id and status, not a copy of the job
    record = json.loads(idempotency)
    assert record["replay"] == {"job": ids[0]}
    assert record["status"] == 202
    assert "body" not in record
    client.close()

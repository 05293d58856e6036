"""/healthz, /readyz (Redis down and back), /metrics, and refusing to start on a broken catalog."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

from tests.support.procs import ManagedProcess, free_port, wait_until
from tests.support.redis_server import RedisServer

GOOD = {"task": "banking77_intent", "input": {"text": "What is the exchange rate?"}}


def test_healthz_and_readyz_answer_ok_when_everything_is_up(api_server: str) -> None:
    # when
    health = httpx.get(f"{api_server}/healthz")
    ready = httpx.get(f"{api_server}/readyz")

    # then
    assert health.status_code == 200
    assert ready.status_code == 200
    assert ready.json()["checks"]["redis"]["ok"] is True
    assert ready.json()["checks"]["catalog"]["tasks"] >= 3


def test_readyz_is_503_while_redis_is_down_and_ok_again_after(api_server: str, api_client: httpx.Client,
                                                              redis_server: RedisServer) -> None:
    # given
    assert httpx.get(f"{api_server}/readyz").status_code == 200
    redis_server.kill()
    try:
        # when
        down = httpx.get(f"{api_server}/readyz", timeout=10)
        alive = httpx.get(f"{api_server}/healthz")
        submit = api_client.post("/v1/jobs", json=GOOD)
    finally:
        redis_server.restart()

    # then
    assert down.status_code == 503
    error = down.json()["error"]
    assert error["code"] == "not_ready"
    assert error["details"]["checks"]["redis"]["ok"] is False
    assert alive.status_code == 200
    # The cached tenant lets the request reach the store, which answers 503 in the error shape;
    # an uncached one fails at the look-up with the same answer.
    assert submit.status_code == 503
    assert submit.json()["error"]["code"] == "unavailable"
    wait_until(lambda: httpx.get(f"{api_server}/readyz").status_code == 200, 30, "readyz to recover")


def test_metrics_count_submitted_jobs(api_client: httpx.Client) -> None:
    # given
    api_client.post("/v1/jobs", json=GOOD)
    api_client.post("/v1/jobs/batch", json={"jobs": [GOOD, GOOD]})

    # when
    text = api_client.get("/metrics").text

    # then
    assert 'smallfirst_jobs_submitted_total{task="banking77_intent",tier="small"} 3.0' in text


def test_api_refuses_to_start_with_a_broken_catalog_and_says_why(tmp_path: Path, redis_url: str,
                                                                  logs_dir: Path) -> None:
    # given
    catalog = tmp_path / "tasks.yaml"
    catalog.write_text("tasks:\n  - name: broken\n    kind: classify\n    labels: []\n")
    port = free_port()
    process = ManagedProcess(
        f"api-bad-catalog-{port}",
        [sys.executable, "-m", "smallfirst.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        logs_dir, env={"SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog)}).start()

    # when
    try:
        wait_until(lambda: not process.alive(), 30, "the API to give up")
    finally:
        process.stop()

    # then
    assert process.proc is not None
    assert process.proc.returncode != 0
    log = process.log_path.read_text()
    assert f"{catalog}: task 'broken'" in log

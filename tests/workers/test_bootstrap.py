"""A pool whose runtime cannot be built (a broken price file or catalog) stops at start, with the
reason, before it takes a message: the message stays for a healthy worker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.runtime import queue_depth
from smallfirst.common.settings import CoreSettings


def start_worker(pool: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smallfirst.cli", "worker", "--pool", pool, "--concurrency", "1"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def worker_env(redis_url: str, catalog_path: Path, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(catalog_path),
        "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"),
        "SMALLFIRST_INFERENCE_TARGETS": '{"all-minilm-l6-v2": "127.0.0.1:1"}',
        "SMALLFIRST_METRICS_PORT": "0",
        "SMALLFIRST_LOG_JSON": "false",
    }


def waiting_message(redis_url: str, catalog_path: Path, queue: str) -> redis.Redis:
    """One message waiting in `queue`; returns a client to count it with."""
    publisher = Publisher(make_celery(CoreSettings.model_validate({"redis_url": redis_url,
                                                                   "catalog_path": catalog_path})))
    task = k.TASK_RUN_SMALL if queue == k.QUEUE_SMALL else k.TASK_RUN_FRONTIER
    publisher.app.send_task(task, args=["job_that_waits"], queue=queue, priority=k.PRIORITY_NORMAL)
    client = redis.Redis.from_url(redis_url)
    assert queue_depth(client, queue) == 1
    return client


def test_frontier_pool_with_a_broken_price_file_exits_with_the_reason_and_takes_nothing(
        worker_env: dict[str, str], redis_url: str, catalog_path: Path, tmp_path: Path) -> None:
    # given: a price file that is not a price table, and a frontier message waiting
    prices = tmp_path / "prices.yaml"
    prices.write_text("models: [this is: not a table\n", encoding="utf-8")
    client = waiting_message(redis_url, catalog_path, k.QUEUE_FRONTIER)

    # when
    result = start_worker(k.POOL_FRONTIER, {**worker_env, "SMALLFIRST_PRICES_PATH": str(prices)})

    # then
    assert result.returncode != 0
    assert "the frontier worker cannot start" in result.stderr
    assert str(prices) in result.stderr or "price" in result.stderr.lower()
    assert queue_depth(client, k.QUEUE_FRONTIER) == 1


def test_small_pool_with_a_broken_catalog_exits_with_the_reason_and_takes_nothing(
        worker_env: dict[str, str], redis_url: str, catalog_path: Path, tmp_path: Path) -> None:
    # given: a catalog folder whose task file does not parse, and a small-tier message waiting
    broken = tmp_path / "catalog"
    broken.mkdir()
    (broken / "tasks.yaml").write_text("tasks:\n  - name: [unclosed\n", encoding="utf-8")
    client = waiting_message(redis_url, catalog_path, k.QUEUE_SMALL)

    # when
    result = start_worker(k.POOL_SMALL, {**worker_env, "SMALLFIRST_CATALOG_PATH": str(broken)})

    # then
    assert result.returncode != 0
    assert "the small worker cannot start" in result.stderr
    assert "catalog" in result.stderr.lower() or "tasks.yaml" in result.stderr
    assert queue_depth(client, k.QUEUE_SMALL) == 1

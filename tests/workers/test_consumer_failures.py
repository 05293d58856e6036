"""Workers that stop serving are noticed: one whose consumer fails for good exits non-zero within its
grace (it never lingers alive but idle), one that is up but no longer consumes fails its liveness
probe, and the stack's supervisor starts a dead worker again. Real redis-server, real Celery workers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from tests.support.procs import ManagedProcess, wait_until
from tests.support.redis_server import RedisServer
from tests.workers.failing_consumer_worker import SLEEP_TASK, STARTED_KEY

pytestmark = pytest.mark.faults


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: the test kills it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def worker_env(redis_url: str, catalog_path: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog_path),
            "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"), "SMALLFIRST_LOG_JSON": "false",
            "ANTHROPIC_API_KEY": "sim-key", "SMALLFIRST_FRONTIER_BASE_URL": "http://127.0.0.1:1", **extra}


def heartbeat(tmp_path: Path, pool: str = k.POOL_FRONTIER) -> Path:
    return tmp_path / "heartbeats" / f"smallfirst-worker-{pool}.heartbeat"


def probe(env: dict[str, str], max_age_s: float) -> int:
    return subprocess.run([sys.executable, "-m", "smallfirst.cli", "worker-probe", "--pool", k.POOL_FRONTIER,
                           "--max-age-s", str(max_age_s)], env={**os.environ, **env}, capture_output=True,
                          timeout=60, check=False).returncode


def test_worker_whose_consumer_fails_for_good_exits_non_zero_while_a_task_still_runs(
        own_redis: RedisServer, catalog_path: Path, tmp_path: Path, logs_dir: Path) -> None:
    # given: a worker running a long task, whose consumer will fail when it next starts
    flag = tmp_path / "fail-consumer"
    env = worker_env(own_redis.url, catalog_path, tmp_path, FLAG=str(flag), SMALLFIRST_WORKER_EXIT_GRACE_S="2")
    worker = ManagedProcess("failing-consumer", [sys.executable, "-m", "tests.workers.failing_consumer_worker"],
                            logs_dir, env=env).start()
    try:
        worker.wait_ready(heartbeat(tmp_path).exists, timeout_s=90)
        make_celery(CoreSettings.model_validate({"redis_url": own_redis.url, "catalog_path": catalog_path})
                    ).send_task(SLEEP_TASK, args=[600], queue=k.QUEUE_FRONTIER)
        wait_until(lambda: bool(own_redis.client().exists(STARTED_KEY)), 60, "the long task to start")
        flag.touch()

        # when: Redis restarts, so the consumer reconnects and its restart fails
        own_redis.kill()
        own_redis.restart()

        # then: the process leaves with Celery's failure code, without waiting for its 600 s task
        assert worker.proc is not None
        returncode = worker.proc.wait(timeout=120)
        assert returncode == 1, worker.tail()
        assert "Unrecoverable error" in worker.log_path.read_text()
    finally:
        worker.kill()


def test_worker_up_but_no_longer_consuming_fails_its_liveness_probe(
        own_redis: RedisServer, catalog_path: Path, tmp_path: Path, logs_dir: Path) -> None:
    # given: a frontier worker, idle for longer than its stall limit, whose probe passes
    env = worker_env(own_redis.url, catalog_path, tmp_path, SMALLFIRST_WORKER_STALL_S="2")
    node = f"stalling@{socket.gethostname()}"
    worker = ManagedProcess("stalling-worker", [sys.executable, "-m", "smallfirst.cli", "worker", "--pool",
                                                k.POOL_FRONTIER, "--concurrency", "2", "--hostname", node],
                            logs_dir, env=env).start()
    try:
        worker.wait_ready(heartbeat(tmp_path).exists, timeout_s=90)
        time.sleep(6)
        assert probe(env, max_age_s=4) == 0, worker.tail()

        # when: its consumer stops taking messages (the process stays up) and a message waits
        app = make_celery(CoreSettings.model_validate({"redis_url": own_redis.url, "catalog_path": catalog_path}))
        for queue in k.POOL_QUEUES[k.POOL_FRONTIER]:
            replies = app.control.cancel_consumer(queue, destination=[node], reply=True, timeout=10)
            assert replies, f"{node} did not answer cancel_consumer({queue})"
        app.send_task(k.TASK_RUN_FRONTIER, args=["job-that-waits"], queue=k.QUEUE_FRONTIER)

        # then: the heartbeat goes stale and the probe fails, although the worker process is alive
        wait_until(lambda: probe(env, max_age_s=4) != 0, 90, "the liveness probe to fail")
        assert worker.alive()
        assert redis.Redis.from_url(own_redis.url).llen(k.QUEUE_FRONTIER) == 1
    finally:
        worker.kill()


def test_stack_supervisor_starts_a_dead_worker_again_but_not_a_stopped_one(
        own_redis: RedisServer, catalog_path: Path, tmp_path: Path) -> None:
    # given: a stack's frontier pool under its supervisor
    stack = Stack(StackConfig(workdir=tmp_path / "stack", catalog_path=catalog_path, redis_url=own_redis.url,
                              anthropic_api_key="sim-key",
                              extra_env={"SMALLFIRST_FRONTIER_BASE_URL": "http://127.0.0.1:1"}))
    try:
        worker = stack.start_worker(k.POOL_FRONTIER)
        stack.start_supervisor(interval_s=0.2)
        first_pid = worker.proc.pid if worker.proc else None

        # when: the worker dies (SIGKILL)
        worker.kill()

        # then: it is started again, and comes back to serve
        wait_until(lambda: worker.restarts == 1 and worker.alive(), 30, "the supervisor to restart the worker")
        assert worker.proc is not None
        assert worker.proc.pid != first_pid
        worker.wait_ready(timeout_s=90)

        # and a worker stopped on purpose stays stopped
        worker.stop()
        time.sleep(1)
        assert not worker.alive()
        assert worker.restarts == 1
    finally:
        stack.stop_all()

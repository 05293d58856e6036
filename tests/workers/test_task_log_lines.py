"""A worker pool leaves out Celery's two INFO lines per task unless asked for them: written under
a lock the consumer shares with every job thread, they slowed a small worker's intake by a third,
and a job's transitions are in its events and metrics anyway (a real worker process)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from smallfirst.common import constants as k
from smallfirst.common.queues import Publisher
from tests.support.procs import ManagedProcess, wait_until

CELERY_RECEIVED = "Task smallfirst.deliver_webhook["


@pytest.mark.parametrize(("setting", "lines_shown"), [(None, False), ("true", True)])
def test_celery_task_lines_show_only_when_the_setting_asks_for_them(
        redis_url: str, catalog_path: Path, tmp_path: Path, logs_dir: Path, celery_app: Celery,
        setting: str | None, lines_shown: bool) -> None:
    # given: a webhooks pool process, with the setting left out or turned on
    env = {**os.environ, "SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog_path),
           "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"), "SMALLFIRST_METRICS_PORT": "0",
           "SMALLFIRST_LOG_JSON": "false"}
    env.pop("SMALLFIRST_LOG_TASK_LINES", None)
    if setting is not None:
        env["SMALLFIRST_LOG_TASK_LINES"] = setting
    worker = ManagedProcess(f"webhooks-worker-task-lines-{setting}",
                            [sys.executable, "-m", "smallfirst.cli", "worker", "--pool", k.POOL_WEBHOOKS,
                             "--concurrency", "1"], logs_dir, env=env).start()
    client = redis.Redis.from_url(redis_url)
    job_ids = [f"job_{uuid.uuid4().hex}" for _ in range(2)]
    client.zadd(k.WEBHOOK_OUTBOX_KEY, {job_id: time.time() + 3600 for job_id in job_ids})
    try:
        # when: it runs two tasks (deliveries for jobs that do not exist: each drops its outbox entry)
        for job_id in job_ids:
            Publisher(celery_app).publish_webhook(job_id)
        wait_until(lambda: not any(client.zscore(k.WEBHOOK_OUTBOX_KEY, job_id) for job_id in job_ids), 60,
                   "both deliveries ran")
    finally:
        worker.stop()

    # then: Celery's own lines for each task are there only when asked for
    log = worker.log_path.read_text()
    assert (CELERY_RECEIVED in log) is lines_shown, log
    assert ("succeeded in" in log) is lines_shown, log

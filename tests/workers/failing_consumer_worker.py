"""A worker built like the real pools (`make_celery`, `install_pool_runtime`, the threads pool) whose
consumer fails for good once a flag file exists: the next time the consumer starts (after a lost
broker connection) one of its steps raises, which Celery reports as "Unrecoverable error". Its one
task, on the frontier queue, sleeps for as long as its argument says, so that a task is running
when the consumer fails.

    FLAG=/path/to/flag python -m tests.workers.failing_consumer_worker
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

from smallfirst.common import constants as k
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.worker_app import PoolBootstrap, install_pool_runtime

SLEEP_TASK = "tests.sleep"
STARTED_KEY = "test:failing-consumer:started"


class FailsOnceFlagged(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def start(self, parent: Any) -> None:
        if Path(os.environ["FLAG"]).exists():
            raise RuntimeError("the consumer cannot start again (test flag)")


def main() -> None:
    settings = CoreSettings()
    app = make_celery(settings)

    @app.task(name=SLEEP_TASK)
    def sleep(seconds: float) -> None:
        import redis

        redis.Redis.from_url(settings.redis_url).set(STARTED_KEY, "1", ex=600)
        time.sleep(seconds)

    install_pool_runtime(app, settings, k.POOL_FRONTIER, PoolBootstrap(k.POOL_FRONTIER, lambda: None))
    app.steps["consumer"].add(FailsOnceFlagged)
    app.worker_main(["worker", "--pool", "threads", "--concurrency", "2", "--queues", k.QUEUE_FRONTIER,
                     "--without-gossip", "--without-mingle", "--loglevel", "INFO", "--hostname", "failing@%h"])


if __name__ == "__main__":
    main()

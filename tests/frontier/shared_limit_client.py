"""A frontier worker stand-in for the shared-limit test: one OS process running jobs through the
executor the worker builds from its settings (SMALLFIRST_* environment), then reporting as JSON.

    python -m tests.frontier.shared_limit_client --jobs 8 --start-at EPOCH --out result.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import redis

from smallfirst.common.catalog import Task
from smallfirst.frontier_worker.client import build_executor
from smallfirst.frontier_worker.settings import FrontierWorkerSettings

TASK = Task.model_validate({
    "name": "ticket_intent", "kind": "classify",
    "labels": [{"name": "refund"}, {"name": "card_arrival"}],
    "small": {"model": "all-minilm-l6-v2"},
    "frontier": {"model": "claude-haiku-5-5", "max_tokens": 32},
})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="epoch seconds: start together")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    settings = FrontierWorkerSettings()  # from the SMALLFIRST_* environment
    executor = build_executor(settings, redis.Redis.from_url(settings.redis_url))
    time.sleep(max(0.0, args.start_at - time.time()))
    calls = []
    for number in range(args.jobs):
        started = time.time()
        answer = executor.run(TASK, {"text": f"ticket {number}"})
        calls.append({"started": started, "limiter_wait_s": answer.limiter_wait_s,
                      "request_id": answer.request_id})
    args.out.write_text(json.dumps({"calls": calls}))


if __name__ == "__main__":
    main()

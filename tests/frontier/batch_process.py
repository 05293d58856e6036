"""A batch submitter or poller in a process of its own, which stops dead at a pause point so the
test can SIGKILL it exactly there.

    python -m tests.frontier.batch_process submit --redis-url URL --sim-url URL --pause-at after_create \
        --marker PATH
    python -m tests.frontier.batch_process poll ... --pause-at after_mark --pause-after 3 --handled-list KEY

At the pause point (the `--pause-after`-th time it is reached) it writes the marker file and sleeps.
The poll handler appends each custom_id to the Redis list `--handled-list`; with `--atomic` it does
so in one MULTI with the poller's handled mark.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import anthropic
import redis

from smallfirst.frontier_worker.batches import BatchBuffer, BatchConfig, BatchPoller, BatchResult, mark_handled

# Short enough that a test waits seconds, not minutes, for a killed process's locks to expire.
TEST_CONFIG = BatchConfig(max_requests=1000, max_age_s=0.0, create_timeout_s=2.0, lock_ttl_s=3.0,
                          clock_skew_s=30.0, poll_lock_ttl_s=2.0, record_ttl_s=3600)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["submit", "poll"])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--sim-url", required=True)
    parser.add_argument("--pause-at", required=True)
    parser.add_argument("--pause-after", type=int, default=1)
    parser.add_argument("--marker", type=Path, required=True)
    parser.add_argument("--handled-list", default="test:handled")
    parser.add_argument("--atomic", action="store_true")
    args = parser.parse_args()

    client = redis.Redis.from_url(args.redis_url)
    sdk = anthropic.Anthropic(api_key="sk-test", base_url=args.sim_url, max_retries=0)
    reached = 0

    def pause(point: str) -> None:
        nonlocal reached
        if point != args.pause_at:
            return
        reached += 1
        if reached == args.pause_after:
            args.marker.write_text(point)
            time.sleep(3600)

    if args.mode == "submit":
        BatchBuffer(client, sdk, TEST_CONFIG, pause=pause).flush(force=True)
        return

    def handle(result: BatchResult) -> None:
        pipe = client.pipeline(transaction=True)
        pipe.rpush(args.handled_list, result.custom_id)
        if args.atomic:
            mark_handled(pipe, result.batch_id, result.custom_id, TEST_CONFIG.record_ttl_s)
        pipe.execute()

    BatchPoller(client, sdk, handle, TEST_CONFIG, pause=pause).poll()


if __name__ == "__main__":
    main()

"""When the liveness heartbeat calls a worker stalled (smallfirst.common.runtime.ConsumptionMonitor),
on a real Redis: only "messages wait, threads are free, nothing was received for the stall limit"."""

from __future__ import annotations

import time

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.runtime import ConsumptionMonitor

STALL_S = 30.0


@pytest.mark.parametrize(
    ("waiting", "received_ago_s", "active", "consuming"),
    [
        (0, 3600, 0, True),  # idle: nothing to take
        (5, 1, 0, True),  # took a message lately
        (5, 3600, 4, True),  # every thread busy: it cannot take more
        (5, 3600, 1, False),  # messages wait, threads free, nothing arrives: stalled
    ],
)
def test_worker_is_stalled_only_when_messages_wait_for_free_threads_and_none_arrives(
        redis_url: str, waiting: int, received_ago_s: float, active: int, consuming: bool) -> None:
    # given: `waiting` messages in the frontier pool's queues, and a worker of 4 threads
    client = redis.Redis.from_url(redis_url)
    for index in range(waiting):
        client.lpush(k.priority_list_keys(k.QUEUE_FRONTIER)[index % 2], f"message-{index}")
    monitor = ConsumptionMonitor(client, k.POOL_QUEUES[k.POOL_FRONTIER], stall_s=STALL_S, concurrency=4)
    now = time.monotonic()
    monitor.last_received = now - received_ago_s
    # when / then
    assert monitor.consuming(active=active, now=now) is consuming


def test_broker_out_of_reach_is_not_a_stall_of_the_worker() -> None:
    # given: a monitor whose Redis does not answer (nothing listens on the port)
    client = redis.Redis(port=1, socket_connect_timeout=0.5)
    monitor = ConsumptionMonitor(client, (k.QUEUE_SMALL,), stall_s=1.0, concurrency=4)
    # when / then: it keeps beating; restarting every worker would not bring Redis back
    assert monitor.consuming(active=0, now=time.monotonic() + 3600)

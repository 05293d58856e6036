"""A queue message that no worker can decode is kept in the dead letters with its reason, instead
of only a log line, and does not come back (a real worker pool process on a real Redis)."""

from __future__ import annotations

import base64
import json
import os
import sys
import uuid
from pathlib import Path

import redis

from smallfirst.common import constants as k
from smallfirst.common.deadletters import REASON_UNDECODABLE, read_entries
from smallfirst.common.runtime import queue_depth
from tests.support.procs import ManagedProcess, wait_until


def raw_message(body: bytes, headers: dict[str, str], queue: str) -> str:
    """A message as kombu's Redis transport stores it in a queue's list."""
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": "application/json",
        "headers": headers,
        "properties": {"delivery_tag": str(uuid.uuid4()), "body_encoding": "base64", "priority": 0,
                       "delivery_info": {"exchange": "", "routing_key": queue}},
    })


def test_undecodable_and_unknown_messages_are_kept_as_dead_letters(
        redis_url: str, catalog_path: Path, tmp_path: Path, logs_dir: Path) -> None:
    # given a body that is not JSON and a message for a task no pool knows, waiting in a queue
    client = redis.Redis.from_url(redis_url)
    client.lpush(k.QUEUE_WEBHOOKS, raw_message(b"{this is not json", {}, k.QUEUE_WEBHOOKS))
    client.lpush(k.QUEUE_WEBHOOKS, raw_message(b'[["x"], {}, {}]', {"task": "smallfirst.no_such_task",
                                                                  "id": str(uuid.uuid4())}, k.QUEUE_WEBHOOKS))

    # when a worker pool consumes that queue
    env = {**os.environ, "SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(catalog_path),
           "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"), "SMALLFIRST_METRICS_PORT": "0",
           "SMALLFIRST_LOG_JSON": "false"}
    worker = ManagedProcess("webhooks-worker-undecodable",
                            [sys.executable, "-m", "smallfirst.cli", "worker", "--pool", k.POOL_WEBHOOKS,
                             "--concurrency", "1"], logs_dir, env=env).start()
    try:
        wait_until(lambda: len(read_entries(client, k.UNDECODABLE_MESSAGES_TENANT)) == 2, 60,
                   "both messages in the dead letters")
    finally:
        worker.stop()

    # then each is kept with its reason, what went wrong and its body, and neither is queued again
    entries = sorted(read_entries(client, k.UNDECODABLE_MESSAGES_TENANT), key=lambda e: e.message)
    assert {e.reason for e in entries} == {REASON_UNDECODABLE}
    assert "cannot decode" in entries[0].message
    assert "{this is not json" in entries[0].details["body"]
    assert "smallfirst.no_such_task" in entries[1].message
    assert {e.details["queue"] for e in entries} == {k.QUEUE_WEBHOOKS}
    assert queue_depth(client, k.QUEUE_WEBHOOKS) == 0
    assert client.ttl(k.dead_letters_key(k.UNDECODABLE_MESSAGES_TENANT)) > 0

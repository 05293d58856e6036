"""The broker transport every Celery app uses (smallfirst.common.broker), on a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Queue

from smallfirst.common import constants as k
from smallfirst.common.broker import TRANSPORT_PATH, BrokerUrlError, split_broker_url


@pytest.fixture
def delivered_unacked(redis_url: str) -> Iterator[tuple[Connection, Any]]:
    """A connection on the project's transport whose consumer channel holds one delivered,
    unacknowledged message."""
    connection = Connection(redis_url, transport=TRANSPORT_PATH)
    queue = Queue(k.QUEUE_FRONTIER)
    with connection.Producer() as producer:
        producer.publish({"job_id": "j1"}, routing_key=k.QUEUE_FRONTIER, declare=[queue])
    channel = connection.channel()
    received: list[Any] = []
    consumer = connection.Consumer(queue, channel=channel, accept=["json"])
    consumer.register_callback(lambda _body, message: received.append(message))
    consumer.consume()
    connection.drain_events(timeout=5)
    assert len(received) == 1
    yield connection, channel
    connection.release()


def test_channel_closed_after_its_connection_was_collected_restores_its_unacked_message(
        redis_url: str, delivered_unacked: tuple[Connection, Any]) -> None:
    # given: a consumer channel holding an unacked message, whose transport a collect after a lost
    # connection detached (what Celery does before it restarts its consumer steps)
    connection, channel = delivered_unacked
    client = redis.Redis.from_url(redis_url)
    assert client.hlen(k.KOMBU_UNACKED_KEY) == 1
    connection._do_close_transport()
    # when: the channel is closed (kombu's own transport raises AttributeError 'hostname' here)
    channel.close()
    # then: the message is back in its queue, not stranded in the unacked hash
    assert client.llen(k.QUEUE_FRONTIER) == 1
    assert client.hlen(k.KOMBU_UNACKED_KEY) == 0


def test_rediss_url_verifies_the_server_unless_told_otherwise() -> None:
    url, options = split_broker_url("rediss://:pw@redis.internal:6380/0?ssl_ca_certs=/etc/ca.pem")
    assert url == "rediss://:pw@redis.internal:6380/0"
    assert options == {"ssl_cert_reqs": 2, "ssl_ca_certs": "/etc/ca.pem"}  # ssl.CERT_REQUIRED
    _, relaxed = split_broker_url("rediss://redis.internal:6380/0?ssl_cert_reqs=none")
    assert relaxed == {"ssl_cert_reqs": 0}  # ssl.CERT_NONE, only when asked for


def test_plain_url_has_no_tls_options_and_refuses_tls_query_parameters() -> None:
    assert split_broker_url("redis://:pw@127.0.0.1:6379/0") == ("redis://:pw@127.0.0.1:6379/0", None)
    with pytest.raises(BrokerUrlError):
        split_broker_url("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/ca.pem")
    with pytest.raises(BrokerUrlError):
        split_broker_url("rediss://127.0.0.1:6379/0?ssl_cert_reqs=sometimes")

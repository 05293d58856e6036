"""vLLM's engine processes block between steps instead of spinning (engine_processes.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from tests.inference_fixtures import EMBEDDING_MODEL, InferenceServerHandle, require_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture
def limited_condition() -> type:
    """A subclass of vLLM's SpinCondition with the spin limit of 0 s applied (to the subclass, so
    that vLLM's own class stays as it is)."""
    require_vllm()
    from vllm.distributed.device_communicators import shm_broadcast

    from smallfirst.inference.engine_processes import limit_busy_polling

    class Condition(shm_broadcast.SpinCondition):
        pass

    assert limit_busy_polling(0.0, Condition)
    return Condition


@pytest.fixture
def queue_ends(limited_condition: type) -> Iterator[tuple[Any, Any]]:
    """The writer and the reader side of one queue's notifications, made after the limit."""
    import zmq
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    context = zmq.Context()
    address = get_open_zmq_ipc_path()
    writer = limited_condition(is_reader=False, context=context, notify_address=address)
    reader = limited_condition(is_reader=True, context=context, notify_address=address)
    yield writer, reader
    context.destroy(linger=0)


def wait_in_background(reader: Any) -> threading.Event:
    """Start `reader.wait` with no limit of its own (vLLM's would park it until a notification);
    the event is set once it returns."""
    returned = threading.Event()

    def wait() -> None:
        reader.wait(timeout_ms=None)
        returned.set()

    threading.Thread(target=wait, daemon=True).start()
    return returned


def test_a_limited_reader_blocks_at_once_instead_of_spinning(queue_ends: tuple[Any, Any]) -> None:
    # given: the ends of a queue made after the limit
    writer, reader = queue_ends
    # then
    assert reader.busy_loop_s == 0.0
    assert writer.busy_loop_s == 0


def test_a_reader_active_lately_does_not_wait_for_a_lost_notification(queue_ends: tuple[Any, Any]) -> None:
    # given: a reader that just read a message, and a writer that never notifies it again
    _, reader = queue_ends
    reader.record_read()
    # when
    returned = wait_in_background(reader)
    # then: it looks at the queue again soon, as the queue may hold a message after all
    assert returned.wait(10), "an active reader waited for a notification that never came"


def test_an_idle_reader_parks_until_notified(queue_ends: tuple[Any, Any]) -> None:
    # given: a reader whose last message is older than the active window
    from smallfirst.inference.engine_processes import ACTIVE_WINDOW_S

    writer, reader = queue_ends
    reader.last_read = time.monotonic() - ACTIVE_WINDOW_S - 1
    returned = wait_in_background(reader)
    # when: nothing is written for a while, then a notification comes
    parked = not returned.wait(0.5)
    writer.notify()
    # then: it stayed parked, and the notification woke it
    assert parked
    assert returned.wait(10)


def engine_cpu_s(server: InferenceServerHandle) -> float:
    """CPU seconds used so far by the server's vLLM engine processes (the engine core, its worker)."""
    total = 0.0
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if child.name().startswith("VLLM::"):
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            continue
    return total


def test_the_engine_processes_rest_after_a_call(embedding_server: InferenceServerHandle) -> None:
    # given: a call just answered (vLLM's own engine processes would now spin for a second, each
    # taking a whole core)
    from tests.inference.test_inference_service import client_for

    with client_for(embedding_server) as client:
        client.embed(EMBEDDING_MODEL, ["When will my new card arrive?"])
        before, started = engine_cpu_s(embedding_server), time.monotonic()
        # when
        time.sleep(0.8)
        used_s, elapsed_s = engine_cpu_s(embedding_server) - before, time.monotonic() - started
    # then: together they used a small part of one core
    assert used_s < 0.25 * elapsed_s, f"the engine processes used {used_s:.2f} s of CPU in {elapsed_s:.2f} s"

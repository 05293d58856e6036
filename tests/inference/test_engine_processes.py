"""vLLM's engine processes block between steps instead of spinning (engine_processes.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from tests.inference_fixtures import EMBEDDING_MODEL, InferenceServerHandle, require_vllm

pytestmark = pytest.mark.vllm


@pytest.fixture
def spin_condition() -> type:
    """A subclass of vLLM's SpinCondition to patch, so that vLLM's own class stays as it is."""
    require_vllm()
    from vllm.distributed.device_communicators import shm_broadcast

    class Condition(shm_broadcast.SpinCondition):
        pass

    return Condition


@pytest.fixture
def zmq_context() -> Iterator[object]:
    import zmq

    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def test_a_limited_reader_blocks_at_once_instead_of_spinning(spin_condition: type, zmq_context: object) -> None:
    # given
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    from smallfirst.inference.engine_processes import limit_busy_polling

    address = get_open_zmq_ipc_path()
    assert limit_busy_polling(0.0, spin_condition)
    # when
    writer = spin_condition(is_reader=False, context=zmq_context, notify_address=address)
    reader = spin_condition(is_reader=True, context=zmq_context, notify_address=address)
    # then
    assert reader.busy_loop_s == 0.0
    assert writer.busy_loop_s == 0


def test_a_reader_active_lately_does_not_wait_for_a_lost_notification(spin_condition: type,
                                                                       zmq_context: object) -> None:
    # given: a reader that just read a message, and a writer that never notifies it again
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    from smallfirst.inference.engine_processes import limit_busy_polling

    address = get_open_zmq_ipc_path()
    limit_busy_polling(0.0, spin_condition)
    spin_condition(is_reader=False, context=zmq_context, notify_address=address)
    reader = spin_condition(is_reader=True, context=zmq_context, notify_address=address)
    reader.record_read()
    # when: it waits with no limit of its own (vLLM's would park it until a notification)
    returned = threading.Event()

    def wait() -> None:
        reader.wait(timeout_ms=None)
        returned.set()

    threading.Thread(target=wait, daemon=True).start()
    # then: it looks at the queue again soon, as the queue may hold a message after all
    assert returned.wait(10), "an active reader waited for a notification that never came"


def test_an_idle_reader_parks_until_notified(spin_condition: type, zmq_context: object) -> None:
    # given: a reader whose last message is older than the active window
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    from smallfirst.inference.engine_processes import ACTIVE_WINDOW_S, limit_busy_polling

    address = get_open_zmq_ipc_path()
    limit_busy_polling(0.0, spin_condition)
    writer = spin_condition(is_reader=False, context=zmq_context, notify_address=address)
    reader = spin_condition(is_reader=True, context=zmq_context, notify_address=address)
    reader.last_read = time.monotonic() - ACTIVE_WINDOW_S - 1
    returned = threading.Event()

    def wait() -> None:
        reader.wait(timeout_ms=None)
        returned.set()

    threading.Thread(target=wait, daemon=True).start()
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

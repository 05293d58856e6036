"""vLLM's engine processes on CPUs they share with other work: blocking, not spinning, between steps.

On CPU, vLLM runs a model in two processes besides the server's: the engine core (the scheduler)
and its model worker. Every step's work goes from the core to the worker, and its result back,
through shared-memory queues whose readers, after each message, spin on `sched_yield` for a second
(vLLM's default) before they block on a socket until the next message is written. Under a steady
stream of small batches neither process ever blocks, so both spin at full speed between steps and
take the CPU that everything else on the machine needs. Measured through the whole stack on 2
cores (bench/pipeline.py): the inference service used 10.9 ms of CPU per classify job and the
stack ran 133 jobs/s; with readers that block at once, 2.9-3.2 ms and 243 jobs/s. Blocking costs a
socket wake-up per hand-over instead: a lone call of one text took 7-10 ms instead of 5-6.

vLLM has no setting for it, and it starts both processes with `spawn` on CPU, so nothing set in
the server's process reaches them. `SpinLimitedExecutor` is the engine's executor class, which the
engine core process imports when it starts: it limits the spinning there and makes the model
worker's entry point `run_worker`, which limits it in the worker before vLLM's own entry runs. The
limit travels in the environment (`BUSY_POLL_ENV`), which spawned processes inherit.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

from vllm.distributed.device_communicators import shm_broadcast
from vllm.v1.executor.multiproc_executor import MultiprocExecutor, WorkerProc

log = logging.getLogger(__name__)

# Seconds the engine processes spin after a message before they block (InferenceSettings.engine_busy_poll_s).
BUSY_POLL_ENV = "SMALLFIRST_INFERENCE_ENGINE_BUSY_POLL_S"
# After a message, how long a queue counts as active, and how often a blocked reader then looks at
# it whatever the notifications say (at most one wake-up a millisecond, only while active).
ACTIVE_WINDOW_S = 1.0
ACTIVE_RECHECK_MS = 1
_VLLM_WORKER_MAIN = WorkerProc.worker_main


def busy_poll_s_from_env() -> float | None:
    raw = os.environ.get(BUSY_POLL_ENV)
    if raw is None or raw == "":
        return None
    return max(0.0, float(raw))


def limit_busy_polling(busy_poll_s: float, condition: type | None = None) -> bool:
    """Make the readers of this process's shared-memory queues (`condition`: vLLM's SpinCondition)
    spin for at most `busy_poll_s` after a message, then block on the socket the writer notifies
    (queues created from now on).

    A notification can be dropped (the writer's socket keeps at most one in flight, and vLLM
    itself re-reads the queue only every few seconds to recover from that), and a dropped one
    measured a 5 s stall of a single call. So for `ACTIVE_WINDOW_S` after a message, while more
    are likely, a blocked reader also looks at the queue every `ACTIVE_RECHECK_MS`; an idle one
    parks as vLLM has it. Answers whether this vLLM has the knobs."""
    target: Any = condition or getattr(shm_broadcast, "SpinCondition", None)
    init, wait = getattr(target, "__init__", None), getattr(target, "wait", None)
    base_init: Any = getattr(init, "__wrapped__", init)
    base_wait: Any = getattr(wait, "__wrapped__", wait)
    if not (_takes(base_init, "busy_loop_s") and _takes(base_wait, "timeout_ms")):
        log.warning("this vLLM's engine queues have no busy-loop setting; they spin as vLLM chooses")
        return False

    @functools.wraps(base_init)
    def spin_limited_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["busy_loop_s"] = busy_poll_s
        base_init(self, *args, **kwargs)

    @functools.wraps(base_wait)
    def rechecking_wait(self: Any, timeout_ms: int | None = None) -> None:
        if getattr(self, "is_reader", False) and time.monotonic() <= self.last_read + ACTIVE_WINDOW_S:
            timeout_ms = ACTIVE_RECHECK_MS if timeout_ms is None else min(timeout_ms, ACTIVE_RECHECK_MS)
        base_wait(self, timeout_ms=timeout_ms)

    target.__init__ = spin_limited_init
    target.wait = rechecking_wait
    return True


def _takes(function: Any, argument: str) -> bool:
    code = getattr(function, "__code__", None)
    return code is not None and argument in code.co_varnames


def run_worker(*args: Any, **kwargs: Any) -> Any:
    """The model worker process's entry: the spin limit, then vLLM's own entry."""
    busy_poll_s = busy_poll_s_from_env()
    if busy_poll_s is not None:
        limit_busy_polling(busy_poll_s)
    return _VLLM_WORKER_MAIN(*args, **kwargs)


class SpinLimitedExecutor(MultiprocExecutor):
    """vLLM's multiprocess executor, with the spin limit in the engine core and its workers."""

    def _init_executor(self) -> None:
        busy_poll_s = busy_poll_s_from_env()
        if busy_poll_s is not None:
            limit_busy_polling(busy_poll_s)
            # The worker processes are started with this as their target, which `spawn` pickles by
            # reference: they import this module and run `run_worker`.
            WorkerProc.worker_main = staticmethod(run_worker)
        super()._init_executor()

"""Pytest plugin: the Messages-API simulator started as a real process, and a handle to steer it.

Fixtures:
- `frontier_sim`: a `SimControl` for the session's simulator, reset before the test (no queued
  faults, zeroed counters). `frontier_sim_url` is its base URL, for `anthropic.Anthropic(base_url=...)`.
- `start_frontier_sim`: starts a simulator of its own with other settings (an answer strategy, an
  API key), stopped after the test.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from smallfirst.common.catalog import Task
from tests.support.procs import ManagedProcess, free_port

# The session simulator refuses native structured outputs for this (priced, current) model, so the
# executor's forced-tool fallback can be exercised.
SIM_MODEL_WITHOUT_NATIVE_OUTPUT = "claude-haiku-4-5"
CLI_ENTRY = "from smallfirst.cli.main import main; main()"
# A current model the simulator answers with native structured outputs and the price table prices.
HAIKU = "claude-haiku-5-5"


def classify_task(mode: str = "auto", model: str = HAIKU) -> Task:
    """A two-label classify task for the frontier tier (`mode`: its structured_output setting)."""
    return Task.model_validate({
        "name": "ticket_intent", "kind": "classify",
        "labels": [{"name": "refund", "description": "wants money back"},
                   {"name": "card_arrival", "description": "asks where a card is"}],
        "prompt": {"system": "Classify the support ticket.", "user": "Ticket:\n{text}"},
        "small": {"model": "all-minilm-l6-v2"},
        "frontier": {"model": model, "max_tokens": 64, "structured_output": mode},
    })


class SimControl:
    """Steers a running simulator through its admin endpoints."""

    def __init__(self, url: str, process: ManagedProcess) -> None:
        self.url = url
        self.process = process

    def _http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=10.0)

    def healthy(self) -> bool:
        try:
            with self._http() as http:
                return http.get("/_sim/health").status_code == 200
        except httpx.HTTPError:
            return False

    def reset(self) -> None:
        with self._http() as http:
            http.post("/_sim/reset").raise_for_status()

    def queue_faults(self, *faults: dict[str, Any]) -> int:
        """Queue faults for the next requests, e.g. `{"kind": "429", "retry_after_s": 0.3, "count": 2}`."""
        with self._http() as http:
            response = http.post("/_sim/faults", json={"faults": list(faults)})
            response.raise_for_status()
            return int(response.json()["pending"])

    def force_batch_outcomes(self, outcomes: dict[str, str]) -> int:
        """Give these custom_ids an `errored` or `expired` result in the batches created afterwards."""
        with self._http() as http:
            response = http.post("/_sim/batch-outcomes", json={"outcomes": outcomes})
            response.raise_for_status()
            return int(response.json()["forced"])

    def stats(self, log: bool = True) -> dict[str, Any]:
        with self._http() as http:
            response = http.get("/_sim/stats", params={"log": str(log).lower()})
            response.raise_for_status()
            result: dict[str, Any] = response.json()
            return result

    def requests(self, model: str | None = None) -> list[dict[str, Any]]:
        """The request log: arrival time `t` (epoch s), `model`, `output` (text, native, tool), `status`,
        `fault`, `request_id`."""
        entries: list[dict[str, Any]] = self.stats(log=True)["requests"]
        return [e for e in entries if model is None or e["model"] == model]


def _start(logs_dir: Path, name: str, env: dict[str, str]) -> SimControl:
    port = free_port()
    process = ManagedProcess(
        name, [sys.executable, "-c", CLI_ENTRY, "frontier-sim", "--port", str(port)], logs_dir,
        env={"SMALLFIRST_FRONTIER_SIM_LOG_LEVEL": "warning", **env},
    ).start()
    control = SimControl(f"http://127.0.0.1:{port}", process)
    process.wait_ready(control.healthy, timeout_s=60)
    return control


@pytest.fixture(scope="session")
def frontier_sim_session(logs_dir: Path) -> Iterator[SimControl]:
    control = _start(logs_dir, "frontier-sim", {
        "SMALLFIRST_FRONTIER_SIM_MODELS_WITHOUT_NATIVE_STRUCTURED_OUTPUT": f'["{SIM_MODEL_WITHOUT_NATIVE_OUTPUT}"]',
    })
    yield control
    control.process.stop()


@pytest.fixture
def frontier_sim(frontier_sim_session: SimControl) -> SimControl:
    """The session's simulator, with no queued faults and zeroed counters."""
    if not frontier_sim_session.process.alive():
        pytest.fail(f"the frontier simulator died:\n{frontier_sim_session.process.tail()}")
    frontier_sim_session.reset()
    return frontier_sim_session


@pytest.fixture
def frontier_sim_url(frontier_sim: SimControl) -> str:
    return frontier_sim.url


@pytest.fixture
def start_frontier_sim(logs_dir: Path) -> Iterator[Callable[..., SimControl]]:
    """Start a simulator with settings of its own: `start_frontier_sim(STRATEGY="oracle", ...)`,
    keys being SMALLFIRST_FRONTIER_SIM_* names without the prefix."""
    started: list[SimControl] = []

    def start(**settings: str) -> SimControl:
        env = {f"SMALLFIRST_FRONTIER_SIM_{key.upper()}": value for key, value in settings.items()}
        control = _start(logs_dir, f"frontier-sim-{len(started) + 1}", env)
        started.append(control)
        return control

    yield start
    for control in started:
        control.process.stop()

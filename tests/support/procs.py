"""Start real processes for tests: free ports, readiness waits, logs kept for failure reports."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from smallfirst.cli.stack import Component, StackError, free_port

__all__ = ["InfrastructureMissing", "ManagedProcess", "free_port", "python_argv", "require_binary", "wait_until"]


class InfrastructureMissing(RuntimeError):
    """A component a test needs is not installed on this machine."""


def require_binary(name: str) -> str:
    """Path of `name`; a missing binary skips locally but fails under CI=true (it must never hide)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed; .ci/run installs it"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class ManagedProcess(Component):
    """A process of a test: the stack's own supervised `Component` (services/cli/.../stack.py),
    with its log named after it in the test's log folder and a readiness condition given when
    waiting. The log is printed when a test fails."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        super().__init__(name=name, argv=list(argv), env=dict(env or {}), log_path=log_dir / f"{name}.log",
                         ready=lambda: True, cwd=cwd)

    def start(self, wait: bool = False) -> ManagedProcess:
        super().start(wait=wait)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # The condition comes first, as the tests call it: not substitutable for Component's, on purpose.
    def wait_ready(self, condition: Callable[[], bool] | None = None,  # type: ignore[override]
                   timeout_s: float | None = None) -> None:
        if condition is not None:
            self.ready = condition
        try:
            super().wait_ready(timeout_s)
        except StackError as exc:
            raise TimeoutError(str(exc)) from exc

    def stop(self, timeout_s: float = 20.0) -> int | None:
        return super().stop(timeout_s)


def python_argv(*args: str) -> list[str]:
    return [sys.executable, *args]

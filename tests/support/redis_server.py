"""A real redis-server started by the tests on a free port, which a test may kill and restart."""

from __future__ import annotations

import time
from pathlib import Path

import redis

from tests.support.procs import ManagedProcess, free_port, require_binary, wait_until


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The settings the job store relies on (see README, "Redis"): AOF on, never evict.
        argv = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction", "--daemonize", "no",
        ]
        self.process = ManagedProcess(f"redis-{self.port}", argv, self.workdir).start()
        self.process.wait_ready(self._pings, timeout_s=15)
        return self

    def _pings(self) -> bool:
        try:
            return bool(redis.Redis.from_url(self.url, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def restart(self) -> None:
        """Start again on the same port and data folder (the AOF brings the data back)."""
        if self.process is not None and self.process.alive():
            self.process.stop()
        time.sleep(0.1)
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def flush(self) -> None:
        redis.Redis.from_url(self.url).flushall()

    def wait_down(self) -> None:
        wait_until(lambda: not self._pings(), 10, "redis to go down")

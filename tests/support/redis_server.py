"""The tests' real redis-server: the stack's one helper (smallfirst.cli.stack.RedisServer), with a
missing binary skipping locally and failing under CI=true, as every missing component does here."""

from __future__ import annotations

from pathlib import Path

from smallfirst.cli.stack import RedisServer as StackRedisServer
from tests.support.procs import require_binary


class RedisServer(StackRedisServer):
    def __init__(self, workdir: Path, **options: object) -> None:
        super().__init__(workdir=workdir, binary=require_binary("redis-server"), **options)  # type: ignore[arg-type]

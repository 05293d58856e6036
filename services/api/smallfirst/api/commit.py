"""Group commit of new jobs: the submissions that reach the store together share one transaction.

Under load many requests want to store a job at the same moment; each MULTI/EXEC costs a round
trip and the client-side work of a pipeline. While one transaction is in flight the next
submissions queue up, and are then written together with `AsyncJobStore.create_many` (one
SET per job plus one command per index and counter). A request returns only once its own jobs
are committed; a Redis failure fails every request of that group (each answers 503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from smallfirst.common.jobs import Job
from smallfirst.common.store import AsyncJobStore, RecordWrite


@dataclass
class _Pending:
    jobs: Sequence[Job]
    future: asyncio.Future[None]
    also_set: Sequence[RecordWrite] = ()


class GroupCommitter:
    def __init__(self, store: AsyncJobStore, max_group_jobs: int) -> None:
        self.store = store
        self.max_group_jobs = max_group_jobs
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def create(self, jobs: Sequence[Job], also_set: Sequence[RecordWrite] = ()) -> None:
        """Store `jobs` (all or none), together with whatever else is being stored right now, and
        `also_set` (the request's idempotency record) in the same transaction."""
        if not jobs:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(jobs, future, also_set))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="job-group-commit")
        await future

    async def _flush(self) -> None:
        while self._pending:
            group: list[_Pending] = []
            count = 0
            # A request's jobs are never split across transactions (a batch stays all or nothing).
            while self._pending and (not group or count + len(self._pending[0].jobs) <= self.max_group_jobs):
                item = self._pending.pop(0)
                group.append(item)
                count += len(item.jobs)
            committed = False
            error: BaseException | None = None
            try:
                await self.store.create_many([job for item in group for job in item.jobs],
                                             [write for item in group for write in item.also_set])
                committed = True
            except (redis.RedisError, OSError) as exc:
                error = exc
            finally:
                if not committed and error is None:
                    # Cancelled, or a bug: answer every waiting request before the task ends.
                    error = CommitAborted("storing the job was interrupted")
                    group.extend(self._pending)
                    self._pending = []
                for item in group:
                    if item.future.done():
                        continue
                    if committed:
                        item.future.set_result(None)
                    else:
                        item.future.set_exception(error or CommitAborted("not stored"))


class CommitAborted(RuntimeError):
    """The group commit was interrupted before the jobs were stored."""

"""The sync client (`Client`, on `httpx.Client`) and the asyncio client (`AsyncClient`): the same
methods, the same retries (see `_core`), the same models."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from smallfirst_client import _calls
from smallfirst_client._core import (
    MAX_WAIT_PER_CALL_S,
    Call,
    RetryPolicy,
    api_error,
    headers_for,
    retry_delay_s,
)
from smallfirst_client.errors import TransportFailure, WaitTimeout
from smallfirst_client.models import (
    BatchResponse,
    BulkReplayResponse,
    DeadLetter,
    DeadLetterList,
    Job,
    JobList,
    Priority,
    TierHint,
)

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_WAIT_TIMEOUT_S = 300.0


class Client:
    """A tenant's client of the smallfirst API (blocking). Use as a context manager, or `close()`."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, http: httpx.Client | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._own_http = http is None
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
        self.http.headers.update(headers_for(api_key))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own_http:
            self.http.close()

    def _send(self, call: Call) -> Any:
        retry = 0
        while True:
            try:
                response = self.http.request(call.method, call.path, params=call.params, json=call.json,
                                             headers=call.headers,
                                             timeout=call.timeout_s if call.timeout_s else httpx.USE_CLIENT_DEFAULT)
            except httpx.TransportError as exc:
                delay = retry_delay_s(self.retry, call, retry, None)
                if delay is None:
                    raise TransportFailure(f"{call.method} {call.path}: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response.json()
                delay = retry_delay_s(self.retry, call, retry, response)
                if delay is None:
                    raise api_error(response)
            time.sleep(delay)
            retry += 1

    # ---- jobs -------------------------------------------------------------------------------------
    def submit(self, task: str, input: Mapping[str, str], *, tier: TierHint | str = TierHint.AUTO,
               priority: Priority | str = Priority.NORMAL, deadline_s: float | None = None,
               local_only: bool = False, metadata: Mapping[str, str] | None = None,
               callback_url: str | None = None, idempotency_key: str | None = None) -> Job:
        """Submit one job (202: queued). Safe to retry: the call carries an idempotency key."""
        body = _calls.job_body(task, input, tier=tier, priority=priority, deadline_s=deadline_s,
                               local_only=local_only, metadata=metadata, callback_url=callback_url)
        return Job.model_validate(self._send(_calls.submit(body, idempotency_key)))

    def submit_batch(self, jobs: Sequence[Mapping[str, Any]], *, all_or_nothing: bool = False,
                     idempotency_key: str | None = None) -> BatchResponse:
        """Submit many jobs (each a body as `job_body` makes, or a dict of the same fields)."""
        return BatchResponse.model_validate(self._send(_calls.submit_batch(jobs, all_or_nothing, idempotency_key)))

    def get(self, job_id: str, *, wait_s: float = 0.0) -> Job:
        """The job; with `wait_s` (at most 60, the server's cap), answered as soon as it ends."""
        return Job.model_validate(self._send(_calls.get(job_id, wait_s)))

    def wait(self, job_id: str, *, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> Job:
        """The job once it has ended, long-polling for at most `timeout_s` in all; WaitTimeout after."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait_s=max(0.0, min(MAX_WAIT_PER_CALL_S, remaining)))
            if job.terminal:
                return job
            if deadline - time.monotonic() <= 0:
                raise WaitTimeout(job, timeout_s)

    def list_jobs(self, *, limit: int | None = None, cursor: str | None = None, status: str | None = None,
                  task: str | None = None, tier: str | None = None, created_after: datetime | float | None = None,
                  created_before: datetime | float | None = None) -> JobList:
        """One page of the tenant's jobs, newest first."""
        return JobList.model_validate(self._send(_calls.list_jobs(
            limit=limit, cursor=cursor, status=status, task=task, tier=tier, created_after=created_after,
            created_before=created_before)))

    def iter_jobs(self, *, page_size: int | None = None, status: str | None = None, task: str | None = None,
                  tier: str | None = None, created_after: datetime | float | None = None,
                  created_before: datetime | float | None = None) -> Iterator[Job]:
        """Every job that matches, page after page, fetched as the iteration reaches it."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(limit=page_size, cursor=cursor, status=status, task=task, tier=tier,
                                  created_after=created_after, created_before=created_before)
            yield from page.data
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        return Job.model_validate(self._send(_calls.cancel(job_id, idempotency_key)))

    def feedback(self, job_id: str, answer: Any, *, comment: str | None = None,
                 idempotency_key: str | None = None) -> dict[str, Any]:
        """The correct answer for a job (`POST /v1/jobs/{id}/feedback`); the server's answer as it is."""
        result: dict[str, Any] = self._send(_calls.feedback(job_id, answer, comment, idempotency_key))
        return result

    # ---- dead letters -----------------------------------------------------------------------------
    def replay(self, job_id: str, *, deadline_s: float | None = None, idempotency_key: str | None = None) -> Job:
        """Run a dead-lettered job again (a repeat for the same entry starts nothing new)."""
        return Job.model_validate(self._send(_calls.replay(job_id, deadline_s, idempotency_key)))

    def list_dead_letters(self, *, limit: int | None = None, cursor: str | None = None, reason: str | None = None,
                          failed_after: datetime | float | None = None,
                          failed_before: datetime | float | None = None) -> DeadLetterList:
        return DeadLetterList.model_validate(self._send(_calls.list_dead_letters(
            limit=limit, cursor=cursor, reason=reason, failed_after=failed_after, failed_before=failed_before)))

    def iter_dead_letters(self, *, page_size: int | None = None, reason: str | None = None,
                          failed_after: datetime | float | None = None,
                          failed_before: datetime | float | None = None) -> Iterator[DeadLetter]:
        cursor: str | None = None
        while True:
            page = self.list_dead_letters(limit=page_size, cursor=cursor, reason=reason, failed_after=failed_after,
                                          failed_before=failed_before)
            yield from page.data
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def replay_dead_letters(self, *, reason: str | None = None, failed_after: datetime | float | None = None,
                            failed_before: datetime | float | None = None, limit: int = 100,
                            deadline_s: float | None = None, idempotency_key: str | None = None) -> BulkReplayResponse:
        return BulkReplayResponse.model_validate(self._send(_calls.replay_dead_letters(
            reason=reason, failed_after=failed_after, failed_before=failed_before, limit=limit,
            deadline_s=deadline_s, idempotency_key=idempotency_key)))


class AsyncClient:
    """The asyncio twin of `Client`: the same methods, awaited; `iter_*` are async iterators."""

    def __init__(self, base_url: str, api_key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry: RetryPolicy | None = None, http: httpx.AsyncClient | None = None) -> None:
        self.retry = retry or RetryPolicy()
        self._own_http = http is None
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout_s)
        self.http.headers.update(headers_for(api_key))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def _send(self, call: Call) -> Any:
        retry = 0
        while True:
            try:
                response = await self.http.request(
                    call.method, call.path, params=call.params, json=call.json, headers=call.headers,
                    timeout=call.timeout_s if call.timeout_s else httpx.USE_CLIENT_DEFAULT)
            except httpx.TransportError as exc:
                delay = retry_delay_s(self.retry, call, retry, None)
                if delay is None:
                    raise TransportFailure(f"{call.method} {call.path}: {type(exc).__name__}: {exc}") from exc
            else:
                if response.status_code < 400:
                    return response.json()
                delay = retry_delay_s(self.retry, call, retry, response)
                if delay is None:
                    raise api_error(response)
            await asyncio.sleep(delay)
            retry += 1

    async def submit(self, task: str, input: Mapping[str, str], *,
                     tier: TierHint | str = TierHint.AUTO, priority: Priority | str = Priority.NORMAL,
                     deadline_s: float | None = None, local_only: bool = False,
                     metadata: Mapping[str, str] | None = None, callback_url: str | None = None,
                     idempotency_key: str | None = None) -> Job:
        body = _calls.job_body(task, input, tier=tier, priority=priority, deadline_s=deadline_s,
                               local_only=local_only, metadata=metadata, callback_url=callback_url)
        return Job.model_validate(await self._send(_calls.submit(body, idempotency_key)))

    async def submit_batch(self, jobs: Sequence[Mapping[str, Any]], *, all_or_nothing: bool = False,
                           idempotency_key: str | None = None) -> BatchResponse:
        return BatchResponse.model_validate(
            await self._send(_calls.submit_batch(jobs, all_or_nothing, idempotency_key)))

    async def get(self, job_id: str, *, wait_s: float = 0.0) -> Job:
        return Job.model_validate(await self._send(_calls.get(job_id, wait_s)))

    async def wait(self, job_id: str, *, timeout_s: float = DEFAULT_WAIT_TIMEOUT_S) -> Job:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            job = await self.get(job_id, wait_s=max(0.0, min(MAX_WAIT_PER_CALL_S, remaining)))
            if job.terminal:
                return job
            if deadline - loop.time() <= 0:
                raise WaitTimeout(job, timeout_s)

    async def list_jobs(self, *, limit: int | None = None, cursor: str | None = None, status: str | None = None,
                        task: str | None = None, tier: str | None = None,
                        created_after: datetime | float | None = None,
                        created_before: datetime | float | None = None) -> JobList:
        return JobList.model_validate(await self._send(_calls.list_jobs(
            limit=limit, cursor=cursor, status=status, task=task, tier=tier, created_after=created_after,
            created_before=created_before)))

    async def iter_jobs(self, *, page_size: int | None = None, status: str | None = None, task: str | None = None,
                        tier: str | None = None, created_after: datetime | float | None = None,
                        created_before: datetime | float | None = None) -> AsyncIterator[Job]:
        cursor: str | None = None
        while True:
            page = await self.list_jobs(limit=page_size, cursor=cursor, status=status, task=task, tier=tier,
                                        created_after=created_after, created_before=created_before)
            for job in page.data:
                yield job
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def cancel(self, job_id: str, *, idempotency_key: str | None = None) -> Job:
        return Job.model_validate(await self._send(_calls.cancel(job_id, idempotency_key)))

    async def feedback(self, job_id: str, answer: Any, *, comment: str | None = None,
                       idempotency_key: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._send(_calls.feedback(job_id, answer, comment, idempotency_key))
        return result

    async def replay(self, job_id: str, *, deadline_s: float | None = None,
                     idempotency_key: str | None = None) -> Job:
        return Job.model_validate(await self._send(_calls.replay(job_id, deadline_s, idempotency_key)))

    async def list_dead_letters(self, *, limit: int | None = None, cursor: str | None = None,
                                reason: str | None = None, failed_after: datetime | float | None = None,
                                failed_before: datetime | float | None = None) -> DeadLetterList:
        return DeadLetterList.model_validate(await self._send(_calls.list_dead_letters(
            limit=limit, cursor=cursor, reason=reason, failed_after=failed_after, failed_before=failed_before)))

    async def iter_dead_letters(self, *, page_size: int | None = None, reason: str | None = None,
                                failed_after: datetime | float | None = None,
                                failed_before: datetime | float | None = None) -> AsyncIterator[DeadLetter]:
        cursor: str | None = None
        while True:
            page = await self.list_dead_letters(limit=page_size, cursor=cursor, reason=reason,
                                                failed_after=failed_after, failed_before=failed_before)
            for entry in page.data:
                yield entry
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def replay_dead_letters(self, *, reason: str | None = None, failed_after: datetime | float | None = None,
                                  failed_before: datetime | float | None = None, limit: int = 100,
                                  deadline_s: float | None = None,
                                  idempotency_key: str | None = None) -> BulkReplayResponse:
        return BulkReplayResponse.model_validate(await self._send(_calls.replay_dead_letters(
            reason=reason, failed_after=failed_after, failed_before=failed_before, limit=limit,
            deadline_s=deadline_s, idempotency_key=idempotency_key)))

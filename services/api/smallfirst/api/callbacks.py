"""Checking callback URLs at submission: the syntax at once, the host's addresses (DNS) only after
authentication and quota, on a small pool of its own, with a timeout and a bound on lookups in flight.

DNS is slow when a tenant wants it to be (a domain whose name server never answers): on the API's
shared thread pool such lookups would hold the threads every other request needs, and before the
quota check they would cost nothing to the tenant who sends them. Here at most `max_concurrency`
lookups run at once, at most `max_pending` are in flight or queued (beyond that a submission gets
503 and is retried), and a submission waits at most `timeout_s` for its lookup. A lookup that
timed out still holds its thread until the resolver gives up, which is why the pending bound
counts lookups until they really end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from smallfirst.api.errors import ApiError
from smallfirst.common import constants as k
from smallfirst.common.webhooks import CallbackUrlRefused, Resolver, check_callback_url

log = logging.getLogger(__name__)


def refused(url: str, exc: CallbackUrlRefused) -> ApiError:
    return ApiError(422, exc.code, str(exc), {"callback_url": url})


class CallbackChecker:
    def __init__(self, *, max_concurrency: int, max_pending: int, timeout_s: float,
                 resolver: Resolver | None = None) -> None:
        self.max_pending = max_pending
        self.timeout_s = timeout_s
        self.resolver = resolver
        self._executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="callback-dns")
        self._pending = 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    def check_syntax(urls: Iterable[str]) -> dict[str, ApiError]:
        """The URLs refused without any lookup (scheme, host, credentials), each with its error."""
        errors: dict[str, ApiError] = {}
        for url in set(urls):
            try:
                check_callback_url(url, True)
            except CallbackUrlRefused as exc:
                errors[url] = refused(url, exc)
        return errors

    async def check_addresses(self, urls: Iterable[str]) -> dict[str, ApiError]:
        """The URLs whose host does not resolve to public addresses only (or not in time)."""
        unique = sorted(set(urls))
        if not unique:
            return {}
        if self._pending + len(unique) > self.max_pending:
            raise ApiError(503, "callback_check_busy",
                           "too many callback URL lookups are in progress; retry shortly",
                           {"retry_after_s": 1}, headers={k.HEADER_RETRY_AFTER: "1"})
        results = await asyncio.gather(*(self._check_one(url) for url in unique))
        return {url: error for url, error in zip(unique, results, strict=True) if error is not None}

    async def _check_one(self, url: str) -> ApiError | None:
        loop = asyncio.get_running_loop()
        self._pending += 1
        future = loop.run_in_executor(self._executor, self._resolve_and_check, url)

        def ended(done: asyncio.Future[None]) -> None:
            self._pending -= 1
            if not done.cancelled():
                done.exception()  # retrieved: a lookup that outlived its timeout logs no warning

        future.add_done_callback(ended)
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except CallbackUrlRefused as exc:
            return refused(url, exc)
        except TimeoutError:
            log.info("callback URL %s: no DNS answer within %.1f s", url, self.timeout_s)
            return refused(url, CallbackUrlRefused(
                f"callback_url host did not resolve within {self.timeout_s:g} s"))
        return None

    def _resolve_and_check(self, url: str) -> None:
        check_callback_url(url, False, resolver=self.resolver)

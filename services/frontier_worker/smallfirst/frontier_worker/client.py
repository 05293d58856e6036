"""Factories for the frontier tier: the Anthropic client, the shared limiter, the executor.

Call them after the worker process has started (Celery's `worker_process_init`): HTTP connection
pools and Redis connections must not cross a fork.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anthropic
import redis

from smallfirst.common.pricing import load_price_table
from smallfirst.frontier_worker.executor import FrontierExecutor, RetryPolicy
from smallfirst.frontier_worker.ratelimit import RedisRateLimiter

if TYPE_CHECKING:
    # Only for annotations: settings.py re-exports build_executor from here.
    from smallfirst.frontier_worker.settings import FrontierWorkerSettings

log = logging.getLogger(__name__)


def build_anthropic_client(settings: FrontierWorkerSettings) -> anthropic.Anthropic:
    endpoint = settings.endpoint()
    if endpoint.simulated:
        log.warning("no Anthropic API key configured: frontier calls go to the DEVELOPMENT SIMULATOR at %s; "
                    "its answers say nothing about model quality", endpoint.base_url)
    # The executor owns retries (counted once, budgeted per job); the SDK must not retry as well.
    return anthropic.Anthropic(api_key=endpoint.api_key, base_url=endpoint.base_url, max_retries=0)


def retry_policy(settings: FrontierWorkerSettings) -> RetryPolicy:
    return RetryPolicy(
        max_attempts=settings.frontier_max_attempts,
        max_wait_s=settings.frontier_retry_max_wait_s,
        backoff_base_ms=settings.frontier_backoff_base_ms,
        backoff_max_ms=settings.frontier_backoff_max_ms,
    )


def build_limiter(settings: FrontierWorkerSettings, client: redis.Redis) -> RedisRateLimiter:
    return RedisRateLimiter(client, settings.frontier_rate_limits, settings.frontier_default_rate_limit,
                            max_wait_s=settings.frontier_limiter_max_wait_s)


def build_executor(settings: FrontierWorkerSettings, redis_client: redis.Redis) -> FrontierExecutor:
    return FrontierExecutor(
        build_anthropic_client(settings),
        build_limiter(settings, redis_client),
        load_price_table(settings.prices_path),
        retry_policy(settings),
        tool_only_models=settings.frontier_tool_only_models,
    )

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
from smallfirst.frontier_worker.batches import BatchConfig
from smallfirst.frontier_worker.cancellation import ThreadClients
from smallfirst.frontier_worker.executor import FrontierExecutor, RetryPolicy
from smallfirst.frontier_worker.ratelimit import RedisRateLimiter

if TYPE_CHECKING:
    # Only for annotations, and settings.py imports nothing from here.
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
    client = build_anthropic_client(settings)
    return FrontierExecutor(
        client,
        build_limiter(settings, redis_client),
        load_price_table(settings.prices_path),
        retry_policy(settings),
        tool_only_models=settings.frontier_tool_only_models,
        thread_clients=ThreadClients(client),
    )


def batch_config(settings: FrontierWorkerSettings) -> BatchConfig:
    return BatchConfig(
        max_requests=settings.frontier_batch_max_requests,
        max_age_s=settings.frontier_batch_max_age_s,
        create_timeout_s=settings.frontier_batch_create_timeout_s,
        lock_ttl_s=settings.frontier_batch_lock_ttl_s,
        clock_skew_s=settings.frontier_batch_clock_skew_s,
        poll_lock_ttl_s=settings.frontier_batch_poll_lock_ttl_s,
        record_ttl_s=settings.frontier_batch_record_ttl_s,
    )

"""The frontier executor's metrics, with the real anthropic SDK against the Messages-API simulator and
the shared rate limiter on a real Redis: each provider call counted by outcome, each response's tokens
and cost, each wait for the limiter."""

from __future__ import annotations

import anthropic
import pytest
import redis
from prometheus_client import CollectorRegistry

from smallfirst.common.metrics import FrontierMetrics
from smallfirst.common.pricing import default_price_table
from smallfirst.frontier_worker.errors import FrontierBadRequest
from smallfirst.frontier_worker.executor import FrontierExecutor, RetryPolicy
from smallfirst.frontier_worker.ratelimit import RateLimit, RedisRateLimiter
from tests.frontier_fixtures import HAIKU, SimControl, classify_task

MODEL = HAIKU
QUICK_RETRIES = RetryPolicy(max_attempts=6, max_wait_s=10.0, backoff_base_ms=20, backoff_max_ms=40)


def executor(sim: SimControl, registry: CollectorRegistry, limiter: RedisRateLimiter) -> FrontierExecutor:
    client = anthropic.Anthropic(api_key="sk-test", base_url=sim.url, max_retries=0)
    return FrontierExecutor(client, limiter, default_price_table(), QUICK_RETRIES, metrics=FrontierMetrics(registry))


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


def test_each_provider_call_is_counted_by_outcome_and_the_answer_by_its_tokens_and_cost(
        frontier_sim: SimControl, redis_url: str) -> None:
    # given a provider that refuses four calls in four different ways before it answers
    registry = CollectorRegistry()
    limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), {MODEL: RateLimit(requests_per_min=1000)})
    frontier_sim.queue_faults({"kind": "429", "retry_after_s": 0.05}, {"kind": "529", "retry_after_s": 0.05},
                              {"kind": "500"}, {"kind": "drop"})

    # when the executor answers a job
    answer = executor(frontier_sim, registry, limiter).run(classify_task(), {"text": "refund please"})

    # then every call is counted once with its outcome, and the one answer's tokens and cost
    assert answer.provider_retries == 4
    assert {outcome: value(registry, "smallfirst_frontier_requests_total", model=MODEL, outcome=outcome)
            for outcome in ("rate_limited", "overloaded", "server_error", "connection_error", "ok")} == {
        "rate_limited": 1, "overloaded": 1, "server_error": 1, "connection_error": 1, "ok": 1}
    assert value(registry, "smallfirst_frontier_tokens_total", model=MODEL, direction="input") == \
        answer.usage.input_tokens
    assert value(registry, "smallfirst_frontier_tokens_total", model=MODEL, direction="output") == \
        answer.usage.output_tokens
    assert answer.cost_usd > 0
    assert value(registry, "smallfirst_frontier_cost_usd_total", model=MODEL) == answer.cost_usd
    # and each of the five calls first took its place in the shared limit
    assert value(registry, "smallfirst_frontier_ratelimit_wait_seconds_count", model=MODEL) == 5


def test_a_refused_request_is_counted_as_a_client_error_and_costs_nothing(
        frontier_sim: SimControl, redis_url: str) -> None:
    # given a provider that refuses the request as malformed
    registry = CollectorRegistry()
    limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), {MODEL: RateLimit(requests_per_min=1000)})
    frontier_sim.queue_faults({"kind": "400"})

    # when the executor tries the job
    with pytest.raises(FrontierBadRequest):
        executor(frontier_sim, registry, limiter).run(classify_task(), {"text": "refund please"})

    # then one client error is counted and no tokens or cost
    assert value(registry, "smallfirst_frontier_requests_total", model=MODEL, outcome="client_error") == 1
    assert value(registry, "smallfirst_frontier_requests_total", model=MODEL, outcome="ok") == 0
    assert value(registry, "smallfirst_frontier_cost_usd_total", model=MODEL) == 0


def test_the_time_a_call_waits_for_the_shared_limit_is_recorded(frontier_sim: SimControl, redis_url: str) -> None:
    # given a shared limit of one request per window
    registry = CollectorRegistry()
    limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), {MODEL: RateLimit(requests_per_min=1, window_s=0.5)})
    run = executor(frontier_sim, registry, limiter).run

    # when two jobs are answered one after the other
    first = run(classify_task(), {"text": "refund please"})
    second = run(classify_task(), {"text": "where is my card"})

    # then the second waited for the window, and the histogram holds exactly the waits the answers report
    assert second.limiter_wait_s > 0
    assert value(registry, "smallfirst_frontier_ratelimit_wait_seconds_count", model=MODEL) == 2
    assert value(registry, "smallfirst_frontier_ratelimit_wait_seconds_sum", model=MODEL) == \
        first.limiter_wait_s + second.limiter_wait_s

"""The shared limiter on a real Redis: sliding windows per model over requests and tokens."""

from __future__ import annotations

import pytest
import redis

from smallfirst.frontier_worker.ratelimit import RateLimit, RateLimitTimeout, RateLimitTooLarge, RedisRateLimiter

MODEL = "claude-haiku-5-5"
OTHER = "claude-sonnet-5-5"


def limiter(redis_url: str, limits: dict[str, RateLimit], max_wait_s: float = 0.0,
            default: RateLimit | None = None) -> RedisRateLimiter:
    return RedisRateLimiter(redis.Redis.from_url(redis_url), limits, default, max_wait_s=max_wait_s)


def test_requests_beyond_the_limit_are_refused_when_they_may_not_wait(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(requests_per_min=3, window_s=30)})

    # when
    admitted = [limits.acquire(MODEL, 10, 10) for _ in range(3)]
    with pytest.raises(RateLimitTimeout) as raised:
        limits.acquire(MODEL, 10, 10)

    # then
    assert all(r.limited and r.wait_s < 1 for r in admitted)
    assert raised.value.retry_after_s is not None
    assert 0 < raised.value.retry_after_s <= 30 + 0.1


def test_a_request_waits_until_the_window_frees_a_slot(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(requests_per_min=2, window_s=0.5)}, max_wait_s=5)
    limits.acquire(MODEL, 1, 1)
    limits.acquire(MODEL, 1, 1)

    # when
    third = limits.acquire(MODEL, 1, 1)

    # then
    assert third.wait_s > 0


def test_output_tokens_are_reserved_at_max_tokens_and_reconciled_with_usage(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(output_tokens_per_min=100, window_s=30)})
    first = limits.acquire(MODEL, 5, 80)
    with pytest.raises(RateLimitTimeout):
        limits.acquire(MODEL, 5, 80)

    # when: the first call used 10 of its 80 reserved tokens
    limits.reconcile(first, 5, 10)
    second = limits.acquire(MODEL, 5, 80)

    # then
    assert second.limited
    assert second.output_tokens == 80


def test_input_tokens_count_against_their_own_limit(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(input_tokens_per_min=1000, window_s=30)})
    limits.acquire(MODEL, 900, 1)

    # when / then
    with pytest.raises(RateLimitTimeout):
        limits.acquire(MODEL, 200, 1)
    assert limits.acquire(MODEL, 100, 1).limited


def test_a_request_larger_than_a_whole_window_is_refused_at_once(redis_url: str) -> None:
    limits = limiter(redis_url, {MODEL: RateLimit(input_tokens_per_min=1000)}, max_wait_s=60)
    with pytest.raises(RateLimitTooLarge, match="input_tokens"):
        limits.acquire(MODEL, 1001, 1)


def test_models_are_limited_independently_and_unconfigured_ones_not_at_all(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(requests_per_min=1, window_s=30)})
    limits.acquire(MODEL, 1, 1)

    # when
    other = [limits.acquire(OTHER, 1, 1) for _ in range(5)]

    # then
    assert not any(r.limited for r in other)
    with pytest.raises(RateLimitTimeout):
        limits.acquire(MODEL, 1, 1)
    assert not redis.Redis.from_url(redis_url).keys(f"*{OTHER}*")


def test_the_default_limit_covers_models_without_their_own(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {}, default=RateLimit(requests_per_min=1, window_s=30))
    limits.acquire(OTHER, 1, 1)

    # when / then
    with pytest.raises(RateLimitTimeout):
        limits.acquire(OTHER, 1, 1)


def test_a_refused_request_leaves_no_trace_in_any_dimension(redis_url: str) -> None:
    # given: requests would admit it, output tokens would not
    limits = limiter(redis_url, {MODEL: RateLimit(requests_per_min=10, output_tokens_per_min=100, window_s=30)})
    limits.acquire(MODEL, 1, 100)

    # when
    with pytest.raises(RateLimitTimeout):
        limits.acquire(MODEL, 1, 1)

    # then
    assert redis.Redis.from_url(redis_url).zcard(f"sf:ratelimit:{MODEL}:requests") == 1


def test_tokens_leave_the_window_when_it_has_passed(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(output_tokens_per_min=100, window_s=0.3)}, max_wait_s=5)
    limits.acquire(MODEL, 1, 80)

    # when
    later = limits.acquire(MODEL, 1, 80)

    # then: it waited for the first reservation to leave the window, which then held only its own
    assert later.wait_s > 0
    assert redis.Redis.from_url(redis_url).get(f"sf:ratelimit:{MODEL}:output_tokens:total") == b"80"


def test_a_lost_window_total_is_rebuilt_from_the_window(redis_url: str) -> None:
    # given
    limits = limiter(redis_url, {MODEL: RateLimit(input_tokens_per_min=1000, window_s=30)})
    first = limits.acquire(MODEL, 600, 1)
    limits.reconcile(first, 700, 1)
    redis.Redis.from_url(redis_url).delete(f"sf:ratelimit:{MODEL}:input_tokens:total")

    # when / then
    with pytest.raises(RateLimitTimeout):
        limits.acquire(MODEL, 301, 1)
    assert limits.acquire(MODEL, 300, 1).limited

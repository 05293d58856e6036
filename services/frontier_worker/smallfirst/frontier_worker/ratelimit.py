"""Rate limits per frontier model, shared by every frontier worker process and pod through Redis.

The provider limits an organisation's requests, input tokens and output tokens per minute per model;
scaling the pool out must not exceed them together. Each dimension is a sliding-window log in one
Redis sorted set (`constants.rate_limit_key`): one entry per admitted request, scored by the Redis
server's clock (so workers' clocks do not matter), whose member carries its amount, plus a running
total of the window (`constants.rate_limit_total_key`) so that a check does not scan the window. One Lua script
checks every dimension of a model and admits the request into all of them, or none, atomically: in
any window of `window_s` seconds, the admitted amounts never exceed the limits. (A token bucket or
GCRA would allow a burst of a full bucket on top of the refill, up to twice the limit in one minute.)

Token accounting: input tokens are estimated from the prompt before the call, output tokens are
reserved at the request's `max_tokens` (which is how the provider itself counts output tokens
against the limit at the start of a request). After the call both are reconciled with the usage the
API reported, so the unused part of the reservation is given back to the window; a failed call
keeps its input estimate (it was sent) and gives back its whole output reservation.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import redis
from pydantic import BaseModel, ConfigDict, Field

from smallfirst.common.constants import RATE_LIMIT_DIMENSIONS, rate_limit_key, rate_limit_total_key
from smallfirst.common.errors import ConfigurationError, InfrastructureError

# Requests, input tokens, output tokens: the order the Lua scripts' keys and arguments follow.
DIMENSIONS: Final = RATE_LIMIT_DIMENSIONS
# Spreads workers that were told the same wait, so they do not all retry in the same millisecond.
MAX_JITTER_S: Final = 0.02

# KEYS: for each dimension (requests, input tokens, output tokens) its sorted set, then its total:
# KEYS[2i-1], KEYS[2i]. ARGV: window ms, three limits (0: unlimited), three amounts, reservation id.
# Returns {1, now_ms} when admitted, {0, wait_ms} when not, {-1, dimension} when the amount alone
# exceeds that dimension's limit (it could never be admitted).
# Cost: the entries that left the window since the last call, plus, only when the limit is reached,
# the oldest entries up to the one whose expiry makes room; never a scan of the whole window.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local horizon = now - window
local function amount_of(member)
  return tonumber(string.match(member, ':(%d+)$')) or 0
end
local function used_in(key, total_key)
  local total = redis.call('GET', total_key)
  if total then
    total = tonumber(total)
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', key, '-inf', horizon)) do
      total = total - amount_of(member)
    end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
  else
    -- First use of the key, or the total expired with an idle window: count the window once.
    redis.call('ZREMRANGEBYSCORE', key, '-inf', horizon)
    total = 0
    for _, member in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      total = total + amount_of(member)
    end
  end
  redis.call('SET', total_key, total, 'PX', window * 2)
  return total
end
local function wait_for(key, used, amount, limit)
  local freed, start = 0, 0
  while true do
    local chunk = redis.call('ZRANGE', key, start, start + 63, 'WITHSCORES')
    if #chunk == 0 then
      return window
    end
    for j = 1, #chunk, 2 do
      freed = freed + amount_of(chunk[j])
      if used - freed + amount <= limit then
        return tonumber(chunk[j + 1]) + window - now
      end
    end
    start = start + 64
  end
end
local wait = 0
for i = 1, 3 do
  local limit = tonumber(ARGV[1 + i])
  local amount = tonumber(ARGV[4 + i])
  if limit > 0 and amount > 0 then
    if amount > limit then
      return {-1, i}
    end
    local used = used_in(KEYS[2 * i - 1], KEYS[2 * i])
    if used + amount > limit then
      local until_free = wait_for(KEYS[2 * i - 1], used, amount, limit)
      if until_free > wait then
        wait = until_free
      end
    end
  end
end
if wait > 0 then
  return {0, math.ceil(wait)}
end
for i = 1, 3 do
  local limit = tonumber(ARGV[1 + i])
  local amount = tonumber(ARGV[4 + i])
  if limit > 0 and amount > 0 then
    redis.call('ZADD', KEYS[2 * i - 1], now, ARGV[8] .. ':' .. amount)
    redis.call('INCRBY', KEYS[2 * i], amount)
    redis.call('PEXPIRE', KEYS[2 * i - 1], window * 2)
    redis.call('PEXPIRE', KEYS[2 * i], window * 2)
  end
end
return {1, now}
"""

# KEYS: input-token set and total, output-token set and total. ARGV: reservation id, old/new input,
# old/new output. The entry keeps its admission time; only its amount (and the total) change. An
# entry already out of the window is left alone (it no longer counts).
_RECONCILE_LUA = """
for i = 1, 2 do
  local old = ARGV[2 * i]
  local new = ARGV[2 * i + 1]
  if old ~= new then
    local key, total_key = KEYS[2 * i - 1], KEYS[2 * i]
    local member = ARGV[1] .. ':' .. old
    local score = redis.call('ZSCORE', key, member)
    if score then
      redis.call('ZREM', key, member)
      redis.call('ZADD', key, score, ARGV[1] .. ':' .. new)
      if redis.call('EXISTS', total_key) == 1 then
        redis.call('INCRBY', total_key, tonumber(new) - tonumber(old))
      end
    end
  end
end
return 1
"""


class RateLimit(BaseModel):
    """One model's limits. The *_per_min figures apply to a sliding window of `window_s` seconds:
    a minute, like the provider's limits, unless a test shortens it. None: not limited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_min: int | None = Field(default=None, gt=0)
    input_tokens_per_min: int | None = Field(default=None, gt=0)
    output_tokens_per_min: int | None = Field(default=None, gt=0)
    window_s: float = Field(default=60.0, gt=0)

    def limits(self) -> tuple[int, int, int]:
        return (self.requests_per_min or 0, self.input_tokens_per_min or 0, self.output_tokens_per_min or 0)


class RateLimitTimeout(InfrastructureError):
    """The shared limit would not admit the request within the limiter's maximum wait."""

    def __init__(self, model: str, waited_s: float, retry_after_s: float) -> None:
        super().__init__(f"rate limit of {model}: not admitted within the maximum wait (waited {waited_s:.2f} s, "
                         f"next slot in {retry_after_s:.2f} s)")
        self.model = model
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


class RateLimitTooLarge(ConfigurationError, ValueError):
    """One request needs more than a whole window's limit: it can never be admitted."""

    def __init__(self, model: str, dimension: str, amount: int, limit: int) -> None:
        super().__init__(f"rate limit of {model}: one request needs {amount} {dimension}, "
                         f"more than the limit of {limit} per window")
        self.model = model
        self.dimension = dimension


@dataclass(frozen=True)
class Reservation:
    model: str
    id: str
    input_tokens: int
    output_tokens: int
    # How long acquiring it waited, in seconds (measured, for the limiter-wait metric).
    wait_s: float
    limited: bool


class RedisRateLimiter:
    def __init__(self, client: redis.Redis, limits: Mapping[str, RateLimit], default: RateLimit | None = None,
                 max_wait_s: float = 60.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        self._limits = dict(limits)
        self._default = default
        self.max_wait_s = max_wait_s
        self._sleep = sleep
        self._clock = clock
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._reconcile = client.register_script(_RECONCILE_LUA)

    def limit_for(self, model: str) -> RateLimit | None:
        return self._limits.get(model, self._default)

    @staticmethod
    def keys(model: str) -> list[str]:
        """Per dimension, its sorted set then its running total (the order the scripts expect)."""
        return [key for dimension in DIMENSIONS
                for key in (rate_limit_key(model, dimension), rate_limit_total_key(model, dimension))]

    def acquire(self, model: str, input_tokens: int, output_tokens: int) -> Reservation:
        """Block until the model's limits admit one request of these token amounts.

        Raises RateLimitTimeout when the wait would exceed `max_wait_s`, RateLimitTooLarge when
        the request alone exceeds a limit, redis.RedisError when Redis cannot be reached (the
        limiter fails closed: an unenforced limit would be exceeded by a scaled-out pool).
        """
        reservation_id = uuid.uuid4().hex
        limit = self.limit_for(model)
        if limit is None:
            return Reservation(model, reservation_id, input_tokens, output_tokens, 0.0, limited=False)
        amounts = (1, max(input_tokens, 0), max(output_tokens, 0))
        window_ms = round(limit.window_s * 1000)
        started = self._clock()
        deadline = started + self.max_wait_s
        while True:
            status, value = self._run_acquire(model, window_ms, limit.limits(), amounts, reservation_id)
            if status == 1:
                return Reservation(model, reservation_id, amounts[1], amounts[2], self._clock() - started,
                                   limited=True)
            if status == -1:
                index = int(value) - 1
                raise RateLimitTooLarge(model, DIMENSIONS[index], amounts[index], limit.limits()[index])
            wait_s = value / 1000 + random.uniform(0, MAX_JITTER_S)
            now = self._clock()
            if now + wait_s > deadline:
                raise RateLimitTimeout(model, now - started, wait_s)
            self._sleep(wait_s)

    def _run_acquire(self, model: str, window_ms: int, limits: tuple[int, int, int], amounts: tuple[int, int, int],
                     reservation_id: str) -> tuple[int, int]:
        result: Any = self._acquire(keys=self.keys(model),
                                    args=[window_ms, *limits, *amounts, reservation_id])
        return int(result[0]), int(result[1])

    def reconcile(self, reservation: Reservation, input_tokens: int, output_tokens: int) -> None:
        """Replace a reservation's token estimates with what the call really used."""
        if not reservation.limited:
            return
        self._reconcile(keys=self.keys(reservation.model)[2:],
                        args=[reservation.id, reservation.input_tokens, max(input_tokens, 0),
                              reservation.output_tokens, max(output_tokens, 0)])

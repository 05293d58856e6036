"""Per-tenant quotas in jobs per minute: one counter per tenant and clock minute, shared by all API
processes through Redis. A batch reserves as many jobs as it holds, in one atomic step."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from smallfirst.api.errors import ApiError
from smallfirst.common import constants as k
from smallfirst.common.tenants import Tenant

WINDOW_S = 60
# The counter outlives its minute a little, so a clock skew between API hosts does not reset it.
_COUNTER_TTL_S = 2 * WINDOW_S

# ARGV: limit, wanted, partial (1: grant what is left, 0: all or nothing). Returns {granted, used}.
_RESERVE_SCRIPT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[1])
local want = tonumber(ARGV[2])
local grant = want
if used + want > limit then
  if ARGV[3] == '1' then grant = math.max(0, limit - used) else grant = 0 end
end
if grant > 0 then
  used = redis.call('INCRBY', KEYS[1], grant)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {grant, used}
"""


@dataclass(frozen=True)
class Reservation:
    granted: int
    limit: int | None
    retry_after_s: int
    # The counter the jobs were taken from (None: no limit), so that a refund goes back to it.
    counter_key: str | None = None

    def error(self) -> ApiError:
        return quota_error(self.limit or 0, self.retry_after_s)


def quota_error(limit: int, retry_after_s: int) -> ApiError:
    return ApiError(429, "quota_exceeded",
                    f"quota of {limit} jobs per minute exceeded; retry after {retry_after_s} s",
                    {"limit_jobs_per_minute": limit, "retry_after_s": retry_after_s},
                    headers={k.HEADER_RETRY_AFTER: str(retry_after_s)})


class QuotaLimiter:
    def __init__(self, client: aioredis.Redis, default_jobs_per_minute: int | None) -> None:
        self.redis = client
        self.default_jobs_per_minute = default_jobs_per_minute
        self._reserve = client.register_script(_RESERVE_SCRIPT)

    def limit_for(self, tenant: Tenant) -> int | None:
        return tenant.quota_jobs_per_minute or self.default_jobs_per_minute

    async def reserve(self, tenant: Tenant, jobs: int, *, partial: bool) -> Reservation:
        """Take `jobs` from this minute's quota: all of them, or with `partial` as many as are left."""
        limit = self.limit_for(tenant)
        if limit is None or jobs == 0:
            return Reservation(granted=jobs, limit=limit, retry_after_s=0)
        now = time.time()
        minute = int(now // WINDOW_S)
        counter_key = k.quota_key(tenant.id, minute)
        granted, _ = await self._reserve(keys=[counter_key], args=[limit, jobs, 1 if partial else 0, _COUNTER_TTL_S])
        retry_after_s = max(1, math.ceil((minute + 1) * WINDOW_S - now))
        return Reservation(granted=int(granted), limit=limit, retry_after_s=retry_after_s, counter_key=counter_key)

    async def refund(self, reservation: Reservation, jobs: int) -> None:
        """Give back `jobs` of a reservation that were not stored after all (a refused callback URL)."""
        if reservation.counter_key is not None and jobs > 0:
            await self.redis.decrby(reservation.counter_key, jobs)

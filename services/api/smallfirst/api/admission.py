"""What the API checks before it takes new work: Redis's memory (the guard), then the tenant's
quotas (smallfirst.common.quotas). Both answer with the common error shape and a Retry-After.

The memory guard reads `INFO memory` at most every `redis_memory_check_interval_s` (shared by all
requests of the process) and refuses new submissions with 503 `redis_memory_high` while
used_memory / maxmemory is above `redis_memory_high_water`. The headroom above the mark is for the
work already accepted: workers never check it, so a running job can always write its result. With
no maxmemory set (0) there is nothing to measure against and the guard lets everything through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from smallfirst.api.errors import ApiError
from smallfirst.api.settings import ApiSettings
from smallfirst.common import constants as k
from smallfirst.common.quotas import (
    CODE_BYTES_STORED,
    CODE_JOBS_IN_FLIGHT,
    CODE_RATE_LIMITED,
    Admission,
    QuotaLimits,
)
from smallfirst.common.tenants import Tenant

log = logging.getLogger(__name__)

CODE_REDIS_MEMORY_HIGH = "redis_memory_high"
MEMORY_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class MemoryReading:
    used_bytes: int
    max_bytes: int

    @property
    def ratio(self) -> float | None:
        return self.used_bytes / self.max_bytes if self.max_bytes > 0 else None


class MemoryGuard:
    def __init__(self, client: Any, *, high_water: float, interval_s: float) -> None:
        self.redis = client
        self.high_water = high_water
        self.interval_s = interval_s
        self._reading: MemoryReading | None = None
        self._read_at = 0.0
        self._lock = asyncio.Lock()

    async def reading(self) -> MemoryReading:
        now = time.monotonic()
        if self._reading is not None and now - self._read_at < self.interval_s:
            return self._reading
        async with self._lock:
            if self._reading is None or time.monotonic() - self._read_at >= self.interval_s:
                info = await self.redis.info("memory")
                self._reading = MemoryReading(int(info.get("used_memory", 0)), int(info.get("maxmemory", 0)))
                self._read_at = time.monotonic()
            return self._reading

    async def check(self) -> None:
        """Raise 503 redis_memory_high when Redis is above the high-water mark."""
        reading = await self.reading()
        ratio = reading.ratio
        if ratio is not None and ratio >= self.high_water:
            log.warning("refusing new work: Redis uses %d of %d bytes (%.0f %%, high-water mark %.0f %%)",
                        reading.used_bytes, reading.max_bytes, 100 * ratio, 100 * self.high_water)
            raise ApiError(503, CODE_REDIS_MEMORY_HIGH,
                           "the job store is nearly full; new work is refused until it has room again",
                           {"used_memory_ratio": round(ratio, 4), "high_water": self.high_water},
                           headers={k.HEADER_RETRY_AFTER: str(MEMORY_RETRY_AFTER_S)})


def quota_limits(settings: ApiSettings, tenant: Tenant) -> QuotaLimits:
    """The tenant's own limits, each defaulting to the API's."""
    def pick(own: Any, default: Any) -> Any:
        return own if own is not None else default

    return QuotaLimits(
        max_jobs_in_flight=pick(tenant.quota_max_jobs_in_flight, settings.default_max_jobs_in_flight),
        max_bytes_stored=pick(tenant.quota_max_bytes_stored, settings.default_max_bytes_stored),
        submissions_per_s=pick(tenant.quota_submissions_per_s, settings.default_submissions_per_s),
        submissions_burst=pick(tenant.quota_submissions_burst, settings.default_submissions_burst),
        max_input_bytes=pick(tenant.quota_max_input_bytes, settings.default_max_input_bytes))


_MESSAGES = {
    CODE_JOBS_IN_FLIGHT: "the tenant has {in_flight} jobs in flight, its limit is {limit}",
    CODE_BYTES_STORED: "the tenant stores {stored} bytes; these jobs would pass its limit of {limit}",
    CODE_RATE_LIMITED: "the tenant submits faster than its {limit} jobs per second (burst {burst})",
}


def admission_error(admission: Admission, limits: QuotaLimits) -> ApiError:
    limit: Any = {CODE_JOBS_IN_FLIGHT: limits.max_jobs_in_flight, CODE_BYTES_STORED: limits.max_bytes_stored,
                  CODE_RATE_LIMITED: limits.submissions_per_s}.get(admission.code)
    message = _MESSAGES.get(admission.code, "quota exceeded").format(
        in_flight=admission.jobs_in_flight, stored=admission.bytes_stored, limit=limit,
        burst=limits.submissions_burst)
    retry_after_s = max(1, admission.retry_after_s)
    return ApiError(429, admission.code or "quota_exceeded", f"{message}; retry after {retry_after_s} s",
                    {"limit": limit, "jobs_in_flight": admission.jobs_in_flight,
                     "bytes_stored": admission.bytes_stored, "retry_after_s": retry_after_s},
                    headers={k.HEADER_RETRY_AFTER: str(retry_after_s)})

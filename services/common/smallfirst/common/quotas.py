"""Per-tenant quotas that keep one tenant from filling Redis or the queues for everybody.

What is limited, per tenant (the tenant's own value, else the API's default; `QuotaLimits`):

- `max_jobs_in_flight`: jobs accepted and not yet ended;
- `max_bytes_stored`: UTF-8 bytes the tenant keeps in Redis: job inputs and metadata, results,
  error texts, idempotency records;
- `submissions_per_s` with `submissions_burst`: a token bucket (Lua, one key per tenant);
- `max_input_bytes`: UTF-8 bytes of one job's input (checked by the API alone).

Accounting. The counters live in the hash `usage_key(tenant)` and move in the same MULTI as the
writes they count: the job store adds a job's byte delta and its in-flight +1/-1 in the
compare-and-set transaction that writes the record (`account_job_write`), the idempotency store
with the record it writes (`account_record`). So a counted byte is a stored byte, and a job counted
in flight is a job not ended, however often a message is delivered.

Release. A record's bytes are released when it expires: each counted record is a member of the
sorted set `usage_expiry_key(tenant)` scored by when its TTL ends (moved forward on every write,
as the TTL is), with its byte count in `usage_bytes_key(tenant)`. The admission script first
releases up to `RELEASE_BATCH` members whose time has passed (lazy reconcile, atomic in Lua), so
the figure is exact up to records that expired since the tenant's last submission.

A job that expires without ever ending (it made no progress for its whole retention period,
which the sweeper prevents) has its bytes released but stays counted in flight; the hash can be
corrected by hand (HSET jobs_in_flight) should that ever happen.

Admission (`AsyncQuotaGate.admit`) is one Lua script: release expired records, then take tokens
and check the in-flight and byte limits against the counters. The check runs just before the
store's transaction, not inside it: concurrent submissions of one tenant may pass it together,
so a tenant can overshoot by at most the jobs of one group commit (`commit_group_max_jobs`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from smallfirst.common import constants as k
from smallfirst.common.jobs import Job

FIELD_JOBS_IN_FLIGHT = "jobs_in_flight"
FIELD_BYTES_STORED = "bytes_stored"
RELEASE_BATCH = 200

CODE_JOBS_IN_FLIGHT = "quota_jobs_in_flight"
CODE_BYTES_STORED = "quota_bytes_stored"
CODE_RATE_LIMITED = "rate_limited"
CODE_INPUT_TOO_LARGE = "input_too_large"
CODE_CONTROL_CHARACTERS = "control_characters"

# Characters a job's input may hold below U+0020 (and in U+007F..U+009F): tab and newline only.
ALLOWED_CONTROL = frozenset("\t\n")


def idempotency_member(key: str) -> str:
    """The expiry-index member of an idempotency record (job members are job ids)."""
    return f"idem:{key}"


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


def input_bytes(job_input: dict[str, str]) -> int:
    return sum(utf8_len(value) for value in job_input.values())


def control_characters(job_input: dict[str, str]) -> list[dict[str, Any]]:
    """Where the input holds control characters other than tab and newline (first few)."""
    found: list[dict[str, Any]] = []
    for name, value in job_input.items():
        for position, char in enumerate(value):
            code = ord(char)
            if (code < 0x20 or 0x7F <= code <= 0x9F) and char not in ALLOWED_CONTROL:
                found.append({"field": name, "position": position, "codepoint": f"U+{code:04X}"})
                if len(found) >= 5:
                    return found
    return found


def stored_bytes(job: Job) -> int:
    """The bytes of a job that count against its tenant: input, metadata, result and error."""
    total = input_bytes(job.input) + sum(utf8_len(a) + utf8_len(b) for a, b in job.metadata.items())
    # The result, and each attempt's answer (kept on the attempt as well).
    for answer in (job.result, *(a.answer for a in job.attempts)):
        if answer is not None:
            total += utf8_len(answer if isinstance(answer, str)
                              else json.dumps(answer, ensure_ascii=False, separators=(",", ":")))
    if job.error is not None:
        total += utf8_len(job.error.message)
    return total


def account_job_write(pipe: Any, old: Job | None, new: Job, expires_at: float) -> None:
    """Queue, on the pipeline in MULTI that writes `new`, the moves of its tenant's counters."""
    delta = stored_bytes(new) - (stored_bytes(old) if old is not None else 0)
    usage = k.usage_key(new.tenant)
    if delta:
        pipe.hincrby(usage, FIELD_BYTES_STORED, delta)
        pipe.hincrby(k.usage_bytes_key(new.tenant), new.id, delta)
    if old is None and not new.status.terminal:
        pipe.hincrby(usage, FIELD_JOBS_IN_FLIGHT, 1)
    elif old is not None and new.status.terminal and not old.status.terminal:
        pipe.hincrby(usage, FIELD_JOBS_IN_FLIGHT, -1)
    # The record's TTL restarted with this write; so does the moment its bytes are released.
    pipe.zadd(k.usage_expiry_key(new.tenant), {new.id: expires_at})


def account_record(pipe: Any, tenant_id: str, member: str, size_bytes: int, expires_at: float,
                   previous_bytes: int = 0) -> None:
    """Count a record other than a job (an idempotency record) written in the same MULTI."""
    delta = size_bytes - previous_bytes
    if delta:
        pipe.hincrby(k.usage_key(tenant_id), FIELD_BYTES_STORED, delta)
        pipe.hincrby(k.usage_bytes_key(tenant_id), member, delta)
    pipe.zadd(k.usage_expiry_key(tenant_id), {member: expires_at})


@dataclass(frozen=True)
class QuotaLimits:  # None: no limit
    max_jobs_in_flight: int | None
    max_bytes_stored: int | None
    submissions_per_s: float | None
    submissions_burst: int | None
    max_input_bytes: int | None


@dataclass(frozen=True)
class Admission:
    granted: int
    # Why the rest was refused ("" when everything was granted): one of the CODE_* above.
    code: str
    retry_after_s: int
    jobs_in_flight: int
    bytes_stored: int


# KEYS: usage hash, per-record bytes hash, expiry zset, token bucket.
# ARGV: now, max in flight (-1: none), max bytes (-1: none), rate per s (-1: none), burst,
#       partial (1/0), then the bytes of each job wanted.
# Returns {granted, code, retry_after_s, in_flight, bytes}.
_ADMIT_SCRIPT = """
local now = tonumber(ARGV[1])
local max_flight = tonumber(ARGV[2])
local max_bytes = tonumber(ARGV[3])
local rate = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])
local partial = ARGV[6] == '1'
local wanted = #ARGV - 6
-- Release the bytes of records whose TTL has ended.
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, RELEASE_BATCH)
if #expired > 0 then
  local freed = 0
  for _, member in ipairs(expired) do
    freed = freed + tonumber(redis.call('HGET', KEYS[2], member) or '0')
  end
  redis.call('HDEL', KEYS[2], unpack(expired))
  redis.call('ZREM', KEYS[3], unpack(expired))
  if freed ~= 0 then redis.call('HINCRBY', KEYS[1], 'bytes_stored', -freed) end
end
local flight = tonumber(redis.call('HGET', KEYS[1], 'jobs_in_flight') or '0')
local bytes = tonumber(redis.call('HGET', KEYS[1], 'bytes_stored') or '0')
if flight < 0 then flight = 0 end
if bytes < 0 then bytes = 0 end
-- Token bucket: refill since the last take, capped at the burst.
local tokens = burst
if rate > 0 then
  local state = redis.call('HMGET', KEYS[4], 'tokens', 'ts')
  if state[1] then
    tokens = math.min(burst, tonumber(state[1]) + (now - tonumber(state[2])) * rate)
  end
end
local grant = 0
local code = ''
local sum = 0
for i = 1, wanted do
  local size = tonumber(ARGV[6 + i])
  if rate > 0 and grant + 1 > tokens then code = 'rate_limited' break end
  if max_flight >= 0 and flight + grant + 1 > max_flight then code = 'quota_jobs_in_flight' break end
  if max_bytes >= 0 and bytes + sum + size > max_bytes then code = 'quota_bytes_stored' break end
  grant = grant + 1
  sum = sum + size
end
if grant < wanted and not partial then grant = 0 end
local retry = 0
if code == 'rate_limited' then
  retry = math.ceil((grant + 1 - tokens) / rate)
elseif code == 'quota_bytes_stored' then
  local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  retry = 60
  if first[2] then retry = math.max(1, math.min(3600, math.ceil(tonumber(first[2]) - now))) end
elseif code == 'quota_jobs_in_flight' then
  retry = 5
end
if rate > 0 then
  redis.call('HSET', KEYS[4], 'tokens', tostring(tokens - grant), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[4], math.ceil(burst / rate) + 1)
end
return {grant, code, retry, flight, bytes}
""".replace("RELEASE_BATCH", str(RELEASE_BATCH))


def _limit(value: float | None) -> float:
    return -1 if value is None else value


class AsyncQuotaGate:
    """The API's admission check (asyncio client); one round trip per submission."""

    def __init__(self, client: Any) -> None:
        self.redis = client
        self._admit = client.register_script(_ADMIT_SCRIPT)

    async def admit(self, tenant_id: str, limits: QuotaLimits, job_bytes: list[int], *, now: float,
                    partial: bool) -> Admission:
        if not job_bytes:
            return Admission(0, "", 0, 0, 0)
        rate = limits.submissions_per_s
        burst = limits.submissions_burst if limits.submissions_burst is not None else (
            max(1, math.ceil(rate)) if rate else 0)
        raw = await self._admit(
            keys=[k.usage_key(tenant_id), k.usage_bytes_key(tenant_id), k.usage_expiry_key(tenant_id),
                  k.submission_bucket_key(tenant_id)],
            args=[repr(now), _limit(limits.max_jobs_in_flight), _limit(limits.max_bytes_stored),
                  _limit(rate) if rate else -1, burst, 1 if partial else 0, *job_bytes])
        granted, code, retry, flight, stored = raw
        code = code.decode() if isinstance(code, bytes) else str(code)
        return Admission(int(granted), code if int(granted) < len(job_bytes) else "", int(retry), int(flight),
                         int(stored))

    async def usage(self, tenant_id: str) -> dict[str, int]:
        raw = await self.redis.hgetall(k.usage_key(tenant_id))
        fields = {(key.decode() if isinstance(key, bytes) else key): int(value) for key, value in raw.items()}
        return {FIELD_JOBS_IN_FLIGHT: max(0, fields.get(FIELD_JOBS_IN_FLIGHT, 0)),
                FIELD_BYTES_STORED: max(0, fields.get(FIELD_BYTES_STORED, 0))}


def account_new_jobs(pipe: Any, jobs: list[Job], expires_at: dict[str, float]) -> None:
    """`account_job_write` for many new jobs, merged per tenant (a batch: a few commands, not 4 per job)."""
    by_tenant: dict[str, list[Job]] = {}
    for job in jobs:
        by_tenant.setdefault(job.tenant, []).append(job)
    for tenant, group in by_tenant.items():
        sizes = {job.id: stored_bytes(job) for job in group}
        pipe.hincrby(k.usage_key(tenant), FIELD_BYTES_STORED, sum(sizes.values()))
        pipe.hincrby(k.usage_key(tenant), FIELD_JOBS_IN_FLIGHT, sum(1 for job in group if not job.status.terminal))
        pipe.hset(k.usage_bytes_key(tenant), mapping=sizes)
        pipe.zadd(k.usage_expiry_key(tenant), {job.id: expires_at[job.id] for job in group})

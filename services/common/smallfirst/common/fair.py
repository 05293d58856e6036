"""Fair scheduling across tenants: per-tenant lists in front of the Celery tier queues.

Within a tier (Celery queue) and priority, tenants are served in turn by weighted deficit round
robin (DRR), so one tenant's batch of 50,000 jobs delays another tenant's job by at most a few
jobs' worth of work. Celery stays on Redis: a job's first delivery is not published to its Celery
queue but pushed, as "<job id> <traceparent>", onto its tenant's list for that queue and priority
step (`constants.fair_tenant_list_key`); a tenant with waiting entries is in the step's ring
(`fair_ring_key`). One dispatcher per queue (`runtime.Dispatcher`, one elected in the whole
deployment) keeps the Celery queue shallow (`fair_queue_depth` messages) and refills it: one
script call per refill pops up to the free room from the rings, strict across priorities, and
records every popped job in `FAIR_DISPATCHING_KEY` in the same atomic step; the dispatcher then
sends the Celery messages and removes the records. A dispatcher that dies in between leaves the
records, which the sweeper publishes (`Sweeper`), so an accepted job is never lost, only delayed.

DRR: each tenant's quantum per turn is its weight (`Tenant.fair_weight`, an integer, default 1,
read from the tenant record by the script); a turn takes up to the quantum, and a refill that
runs out of room in the middle of a turn leaves the rest of it (the deficit, `fair_deficit_key`)
for the next refill, with the tenant still first in the ring. A tenant whose list empties leaves
the ring and forgets its deficit; a new tenant joins at the ring's end, so it is served within one
round (the sum of the active tenants' weights) whatever the others have queued.

Why not one Celery queue per tenant: every worker would poll every tenant's queue (kombu's Redis
transport polls its queues in a loop; thousands of tenants, and churn), and kombu's queue order
is per poll, not weighted. Why a shallow Celery queue and not none: the workers' prefetch already
holds one message per thread, and a few more messages cover the dispatcher's reaction time, so
throughput is unchanged while a late tenant waits behind at most those.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from smallfirst.common import constants as k
from smallfirst.common.jobs import Job, Priority, Tier

# ARGV[1]: the queue's key base, ARGV[2]: its backlog list, ARGV[3]: its wake-up list, ARGV[4]: the
# wake-up TTL; then (step, tenant, entry) triples. A tenant joins the ring when its list was empty.
_ENQUEUE_SCRIPT = """
local base, backlog, wake = ARGV[1], ARGV[2], ARGV[3]
local count = 0
for i = 5, #ARGV, 3 do
  local step, tenant = ARGV[i], ARGV[i + 1]
  if redis.call('RPUSH', base .. step .. ':t:' .. tenant, ARGV[i + 2]) == 1 then
    redis.call('RPUSH', base .. step .. ':ring', tenant)
  end
  count = count + 1
end
local ones = {}
for i = 1, count do
  ones[#ones + 1] = '1'
  if #ones == 1000 or i == count then
    redis.call('RPUSH', backlog, unpack(ones))
    ones = {}
  end
end
redis.call('LPUSH', wake, '1')
redis.call('LTRIM', wake, 0, 0)
redis.call('EXPIRE', wake, ARGV[4])
return count
"""

# ARGV[1]: key base, [2]: backlog list, [3]: dispatching set, [4]: tenants hash, [5]: room, [6]: now,
# [7]: deficit TTL, [8]: entries per message, [9]: n, the number of lists that follow, whose lengths
# times [8] are taken off the room (the tier queue's messages already waiting: read here, not in a
# round trip of their own), [10..9+n]: those lists, then the priority steps, served strictly in this
# order. Answers {entries, waiting}:
# the popped entries as a flat list {step, entry, step, entry, ...}, and 1 when entries still wait
# in the fair lists after it, else 0. Each turn either pops at least one entry or finds its
# tenant's list empty and drops the tenant, so the loop ends.
_REFILL_SCRIPT = """
local base, backlog, dispatching, tenants = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local room, now, ttl = tonumber(ARGV[5]), ARGV[6], ARGV[7]
local per_message, counted = tonumber(ARGV[8]), tonumber(ARGV[9])
for c = 10, 9 + counted do
  room = room - per_message * redis.call('LLEN', ARGV[c])
end
local out = {}
local cache = {}
local function weight(tenant)
  if cache[tenant] then return cache[tenant] end
  local w = 1
  local raw = redis.call('HGET', tenants, tenant)
  if raw then
    local ok, record = pcall(cjson.decode, raw)
    if ok and type(record) == 'table' and tonumber(record['fair_weight']) then
      w = math.max(1, math.floor(tonumber(record['fair_weight'])))
    end
  end
  cache[tenant] = w
  return w
end
local drained = true
for s = 10 + counted, #ARGV do
  local step = ARGV[s]
  local ring = base .. step .. ':ring'
  local deficits = base .. step .. ':deficit'
  while room > 0 do
    local tenant = redis.call('LINDEX', ring, 0)
    if not tenant then break end
    local list = base .. step .. ':t:' .. tenant
    local deficit = tonumber(redis.call('HGET', deficits, tenant) or '0')
    if deficit <= 0 then deficit = weight(tenant) end
    local got = redis.call('LPOP', list, math.min(deficit, room))
    local n = 0
    if got then
      for _, entry in ipairs(got) do
        out[#out + 1] = step
        out[#out + 1] = entry
        local space = string.find(entry, ' ', 1, true)
        redis.call('ZADD', dispatching, now, space and string.sub(entry, 1, space - 1) or entry)
        n = n + 1
      end
    end
    room = room - n
    deficit = deficit - n
    if redis.call('LLEN', list) == 0 then
      redis.call('LPOP', ring)
      redis.call('HDEL', deficits, tenant)
    elseif deficit <= 0 then
      redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      redis.call('HDEL', deficits, tenant)
    else
      redis.call('HSET', deficits, tenant, deficit)
      redis.call('EXPIRE', deficits, ttl)
    end
  end
  if redis.call('EXISTS', ring) == 1 then drained = false end
end
if drained then
  redis.call('DEL', backlog)
elseif #out > 0 then
  redis.call('LPOP', backlog, #out / 2)
end
return {out, drained and 0 or 1}
"""

# ARGV: (backlog list, wake-up list) pairs, then the wake-up TTL last. Wakes a queue's dispatcher
# only when entries wait in its fair lists: with none there is nothing to refill, and a woken
# dispatcher would only spend a refill (and the worker's CPU) finding that out.
_NUDGE_SCRIPT = """
local ttl = ARGV[#ARGV]
local woken = 0
for i = 1, #ARGV - 1, 2 do
  if redis.call('LLEN', ARGV[i]) > 0 then
    redis.call('LPUSH', ARGV[i + 1], '1')
    redis.call('LTRIM', ARGV[i + 1], 0, 0)
    redis.call('EXPIRE', ARGV[i + 1], ttl)
    woken = woken + 1
  end
end
return woken
"""

# ARGV[1]: owner, ARGV[2]: TTL in ms. Takes a free lock or renews the owner's; 1 when held.
_LOCK_SCRIPT = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


def queue_of(job: Job) -> str:
    """The Celery queue of a job's first delivery (the routing policy's tier)."""
    return k.QUEUE_SMALL if job.route.tier is Tier.SMALL else k.QUEUE_FRONTIER


def step_of(priority: Priority) -> int:
    return k.PRIORITY_BY_NAME[priority.value]


def entry_of(job: Job) -> str:
    return f"{job.id} {job.traceparent}" if job.traceparent else job.id


@dataclass(frozen=True)
class Dispatched:
    """One entry a refill took from a fair list: its Celery message is to be sent."""

    step: int
    job_id: str
    traceparent: str | None


def parse_entry(step: int | bytes | str, raw: bytes | str) -> Dispatched:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    job_id, _, traceparent = text.partition(" ")
    return Dispatched(int(step), job_id, traceparent or None)


class FairQueues:
    """The fair lists' Redis side: enqueue (publishers), refill and the election (the dispatcher)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._enqueue = client.register_script(_ENQUEUE_SCRIPT)
        self._refill = client.register_script(_REFILL_SCRIPT)
        self._lock = client.register_script(_LOCK_SCRIPT)
        self._nudge = client.register_script(_NUDGE_SCRIPT)

    def enqueue(self, jobs: Sequence[Job]) -> int:
        """Put queued jobs in their tenants' lists (one script call per queue) and wake the queue's
        dispatcher. Atomic per queue: every job of the call is waiting, or none."""
        by_queue: dict[str, list[str]] = {}
        for job in jobs:
            by_queue.setdefault(queue_of(job), []).extend((str(step_of(job.priority)), job.tenant, entry_of(job)))
        count = 0
        for queue, triples in by_queue.items():
            count += int(self._enqueue(args=[k.fair_base_key(queue), k.fair_backlog_key(queue),
                                             k.fair_wake_key(queue), k.FAIR_WAKE_TTL_S, *triples]))
        return count

    def refill(self, queue: str, room: int, now: float | None = None) -> list[Dispatched]:
        """Take up to `room` entries from `queue`'s fair lists (DRR over tenants, strict priorities),
        recorded as dispatching in the same script: the caller sends their messages, then `sent`."""
        if room <= 0:
            return []
        return self.take(queue, room, now)[0]

    def take(self, queue: str, depth: int, now: float | None = None, *,
             counted: Sequence[str] = (), per_message: int = 1) -> tuple[list[Dispatched], bool]:
        """`refill` up to `depth` entries less `per_message` for each message waiting in the `counted`
        lists (read in the same script: a refill is one round trip), and whether entries still wait
        in the fair lists."""
        answer = self._refill(args=[k.fair_base_key(queue), k.fair_backlog_key(queue), k.FAIR_DISPATCHING_KEY,
                                    k.TENANTS_KEY, depth, repr(time.time() if now is None else now),
                                    k.FAIR_STATE_TTL_S, per_message, len(counted), *counted, *k.FAIR_STEPS])
        flat, waiting = answer[0], answer[1]
        return [parse_entry(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)], bool(int(waiting))

    def sent(self, job_ids: Sequence[str]) -> None:
        """The messages of these dispatched jobs are on their Celery queue."""
        if job_ids:
            self.redis.zrem(k.FAIR_DISPATCHING_KEY, *job_ids)

    def stranded(self, taken_before: float, limit: int = 500) -> list[str]:
        """Jobs a dispatcher took before `taken_before` and never confirmed sent (it died meanwhile)."""
        ids = self.redis.zrangebyscore(k.FAIR_DISPATCHING_KEY, "-inf", taken_before, start=0, num=limit)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    def backlog(self, queue: str) -> int:
        return int(self.redis.llen(k.fair_backlog_key(queue)))

    def elect(self, queue: str, owner: str, ttl_s: float) -> bool:
        """Take or renew the queue's dispatcher lock; True while `owner` holds it."""
        return bool(int(self._lock(keys=[k.fair_lock_key(queue)], args=[owner, int(ttl_s * 1000)])))

    def resign(self, queue: str, owner: str) -> None:
        if (holder := self.redis.get(k.fair_lock_key(queue))) is not None and holder.decode() == owner:
            self.redis.delete(k.fair_lock_key(queue))

    def nudge(self, queues: Sequence[str]) -> int:
        """Wake the dispatchers of those of `queues` whose fair lists hold entries: a worker took a
        message, so there is room to refill (without it a dispatcher behind a full queue looks again
        every `fair_poll_s`). One script call; answers how many were woken. A queue with nothing
        waiting is left asleep: an enqueue wakes its dispatcher itself."""
        pairs = [key for queue in queues for key in (k.fair_backlog_key(queue), k.fair_wake_key(queue))]
        return int(self._nudge(args=[*pairs, k.FAIR_WAKE_TTL_S])) if pairs else 0

    def wait_for_work(self, queue: str, timeout_s: float) -> bool:
        """Block until something is enqueued for `queue` (True) or `timeout_s` passes (False)."""
        return self.redis.blpop([k.fair_wake_key(queue)], timeout=timeout_s) is not None


__all__ = ["Dispatched", "FairQueues", "entry_of", "parse_entry", "queue_of", "step_of"]

"""Frontier batch mode: a buffer that sends frontier requests as Message Batches, and a poller that
hands their results back, with every step recorded in Redis so that a crash loses and repeats nothing.

Independent of Celery: the caller adds requests (`BatchBuffer.add`), calls `BatchBuffer.flush` and
`BatchBuffer.reconcile` from a loop of its own, and `BatchPoller.poll` with a handler that applies
each result to its job.

One request per job attempt: its `custom_id` is `<job_id>-<attempt>` (`custom_id_for`), since the
API accepts only letters, digits, `_` and `-` in a custom_id.

Crash safety of submission. Taking requests out of the buffer and recording them as an *intent*
(`constants.batch_intent_key`) is one Lua script; the create call follows; the batch id is recorded
with the custom_ids right after, in one MULTI that also deletes the intent. A process killed between
create and record leaves an intent behind. `reconcile` (under the submit lock, so no live submitter
is between take and record) lists the provider's batches and matches each orphaned intent against
batches Redis has no record of, created in the intent's time window with as many requests: once
such a batch has ended, its results show its custom_ids; a batch holding the intent's custom_ids is
adopted (recorded as if the submitter had done it), and an intent no batch can hold goes back to the
buffer. While a possible match is still processing the intent waits, since the API shows a batch's
custom_ids only in its results: an orphan costs latency, never a second send.

Crash safety of results. The poller hands a result to the handler, then adds its custom_id to the
batch's handled set; results already in the set are skipped, so a poller killed mid-results resumes
where it stopped. The one window left is a crash after the handler's effect and before the mark: a
handler that writes through Redis closes it by adding `mark_handled(pipe, batch_id, custom_id)` to
its own MULTI (the poller's later mark is then a no-op); otherwise that one result is handed again,
which a compare-and-set on the job attempt refuses.

Keys (`constants.BATCH_*`): the buffer and the sets of pending intents and active batches have no
TTL (they hold accepted work and are emptied by the code, never by time); a batch's record, handled
and cancelled sets and each custom_id's location expire after `record_ttl_s` (the provider keeps
results 29 days).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import anthropic
import redis
from anthropic.types import Message
from anthropic.types.messages import MessageBatch

from smallfirst.common import constants as k
from smallfirst.common.jobs import Usage

log = logging.getLogger(__name__)

CUSTOM_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# The provider's limit of requests per batch.
MAX_REQUESTS_PER_BATCH = 100_000
LIST_PAGE_SIZE = 100

# Pause points a test hook is called at (`pause`), to kill the process exactly there.
PAUSE_AFTER_INTENT = "after_intent"
PAUSE_AFTER_CREATE = "after_create"
PAUSE_AFTER_HANDLE = "after_handle"
PAUSE_AFTER_MARK = "after_mark"

# KEYS: buffer zset, buffer hash, intents zset, intent hash. ARGV: max requests, now, intent id.
# Moves the oldest requests into the intent in one step; returns how many.
_TAKE_LUA = """
local ids = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1, 'WITHSCORES')
local taken = 0
for i = 1, #ids, 2 do
  local cid = ids[i]
  local req = redis.call('HGET', KEYS[2], cid)
  if req then
    redis.call('HSET', KEYS[4], 'r:' .. cid, req, 't:' .. cid, ids[i + 1])
    taken = taken + 1
  end
  redis.call('HDEL', KEYS[2], cid)
  redis.call('ZREM', KEYS[1], cid)
end
if taken > 0 then
  redis.call('HSET', KEYS[4], 'created_at', ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[3])
end
return taken
"""

# KEYS: a lock. ARGV: its token, TTL ms. Renews the lock only for the holder.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: a lock. ARGV: its token.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def custom_id_for(job_id: str, attempt: int) -> str:
    custom_id = k.batch_custom_id(job_id, attempt)
    if not CUSTOM_ID_PATTERN.match(custom_id):
        raise ValueError(f"job id {job_id!r} with attempt {attempt} makes no valid batch custom_id "
                         f"({CUSTOM_ID_PATTERN.pattern})")
    return custom_id


def parse_custom_id(custom_id: str) -> tuple[str, int]:
    """(job id, attempt number) of a custom_id made by `custom_id_for`."""
    job_id, _, attempt = custom_id.rpartition("-")
    if not job_id or not attempt.isdigit():
        raise ValueError(f"{custom_id!r} is not a smallfirst batch custom_id (<job_id>-<attempt>)")
    return job_id, int(attempt)


@dataclass(frozen=True)
class BatchConfig:
    # A batch is sent when the buffer holds this many requests, or its oldest is this old.
    max_requests: int = 10_000
    max_age_s: float = 60.0
    # The create call's HTTP timeout; the submit lock outlives it, so no reconcile runs mid-create.
    create_timeout_s: float = 120.0
    lock_ttl_s: float = 180.0
    # Allowed difference between this host's clock and the provider's (batch created_at).
    clock_skew_s: float = 300.0
    # How long a poller owns a batch's results without renewing (renewed at every result).
    poll_lock_ttl_s: float = 120.0
    record_ttl_s: int = 30 * 24 * 3600

    def __post_init__(self) -> None:
        if not 1 <= self.max_requests <= MAX_REQUESTS_PER_BATCH:
            raise ValueError(f"max_requests must lie in [1, {MAX_REQUESTS_PER_BATCH}]")
        if self.lock_ttl_s <= self.create_timeout_s:
            raise ValueError("lock_ttl_s must exceed create_timeout_s, or a reconcile could run mid-create")


class ResultType(StrEnum):
    SUCCEEDED = "succeeded"
    ERRORED = "errored"
    CANCELED = "canceled"
    EXPIRED = "expired"


@dataclass(frozen=True)
class BatchResult:
    batch_id: str
    custom_id: str
    type: ResultType
    message: Message | None = None
    # errored: the API's error type (api_error, invalid_request_error, ...) and message.
    error_type: str | None = None
    error_message: str | None = None

    @property
    def job_id(self) -> str:
        return parse_custom_id(self.custom_id)[0]

    @property
    def attempt(self) -> int:
        return parse_custom_id(self.custom_id)[1]

    def usage(self) -> Usage | None:
        """Tokens billed (at the batch price) for a succeeded result; None otherwise."""
        if self.message is None:
            return None
        reported = self.message.usage
        return Usage(input_tokens=reported.input_tokens, output_tokens=reported.output_tokens,
                     cache_creation_input_tokens=reported.cache_creation_input_tokens or 0,
                     cache_read_input_tokens=reported.cache_read_input_tokens or 0)

    @classmethod
    def from_sdk(cls, batch_id: str, line: Any) -> BatchResult:
        result = line.result
        kind = ResultType(result.type)
        if kind is ResultType.SUCCEEDED:
            return cls(batch_id, line.custom_id, kind, message=result.message)
        if kind is ResultType.ERRORED:
            error = result.error.error
            return cls(batch_id, line.custom_id, kind, error_type=error.type, error_message=error.message)
        return cls(batch_id, line.custom_id, kind)


class ResultHandler(Protocol):
    def __call__(self, result: BatchResult) -> None: ...


def mark_handled(pipe: Any, batch_id: str, custom_id: str, record_ttl_s: int) -> None:
    """Add "this result is handled" to a caller's pipeline/MULTI, to make it atomic with its effect."""
    pipe.sadd(k.batch_handled_key(batch_id), custom_id)
    pipe.expire(k.batch_handled_key(batch_id), record_ttl_s)


class CancelOutcome(StrEnum):
    REMOVED = "removed"  # still buffered: taken out, never sent
    BATCH_CANCELLED = "batch_cancelled"  # every request of its batch asked to cancel: the batch is cancelled
    NOT_CANCELLABLE = "not_cancellable"  # its batch carries other jobs' requests (or is being created)
    UNKNOWN = "unknown"  # no such request in batch mode (already handled, or never added)


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Lock:
    def __init__(self, client: redis.Redis, key: str, ttl_s: float) -> None:
        self._client, self.key, self._ttl_ms = client, key, int(ttl_s * 1000)
        self.token = secrets.token_hex(8)

    def acquire(self) -> bool:
        return bool(self._client.set(self.key, self.token, nx=True, px=self._ttl_ms))

    def renew(self) -> bool:
        return bool(self._client.eval(_RENEW_LUA, 1, self.key, self.token, self._ttl_ms))

    def release(self) -> None:
        self._client.eval(_RELEASE_LUA, 1, self.key, self.token)


@dataclass(frozen=True)
class _Intent:
    intent_id: str
    created_at: float
    requests: dict[str, str]  # custom_id -> request JSON ({"custom_id", "params"})
    buffered_at: dict[str, float]


class BatchBuffer:
    """Collects requests in Redis and sends them as batches; safe to use from several processes."""

    def __init__(self, redis_client: redis.Redis, client: anthropic.Anthropic, config: BatchConfig | None = None,
                 *, clock: Callable[[], float] = time.time, pause: Callable[[str], None] | None = None) -> None:
        self._redis = redis_client
        self._client = client
        self.config = config or BatchConfig()
        self._clock = clock
        self._pause = pause or (lambda _point: None)
        self._take = redis_client.register_script(_TAKE_LUA)

    # ---- Adding and cancelling ----------------------------------------------------------------
    def add(self, job_id: str, attempt: int, params: Mapping[str, Any]) -> str:
        """Buffer one Messages request (the `messages.create` keyword arguments); returns its custom_id.
        Adding the same attempt again replaces its params and keeps its place."""
        pipe = self._redis.pipeline(transaction=True)
        custom_id = self.add_to(pipe, job_id, attempt, params)
        pipe.execute()
        return custom_id

    def add_to(self, pipe: Any, job_id: str, attempt: int, params: Mapping[str, Any]) -> str:
        """`add`, queued on a caller's pipeline/MULTI (the job's compare-and-set that begins the attempt)."""
        custom_id = custom_id_for(job_id, attempt)
        body = json.dumps({"custom_id": custom_id, "params": dict(params)})
        pipe.zadd(k.BATCH_BUFFER_KEY, {custom_id: self._clock()}, nx=True)
        pipe.hset(k.BATCH_BUFFER_REQUESTS_KEY, custom_id, body)
        return custom_id

    def pending(self) -> int:
        return int(self._redis.zcard(k.BATCH_BUFFER_KEY))

    def cancel(self, job_id: str, attempt: int) -> CancelOutcome:
        """Withdraw a job attempt's request: from the buffer if not sent yet, else by cancelling its
        batch once every request of that batch was withdrawn (the API cancels whole batches only)."""
        custom_id = custom_id_for(job_id, attempt)
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(k.BATCH_BUFFER_KEY, custom_id)
        pipe.hdel(k.BATCH_BUFFER_REQUESTS_KEY, custom_id)
        removed, _ = pipe.execute()
        if removed:
            return CancelOutcome.REMOVED
        raw_batch_id = self._redis.get(k.batch_location_key(custom_id))
        if raw_batch_id is None:
            in_intent = any(self._redis.hexists(k.batch_intent_key(_decode(i)), f"r:{custom_id}")
                            for i in self._redis.zrange(k.BATCH_INTENTS_KEY, 0, -1))
            return CancelOutcome.NOT_CANCELLABLE if in_intent else CancelOutcome.UNKNOWN
        batch_id = _decode(raw_batch_id)
        record = self._redis.hget(k.batch_record_key(batch_id), "custom_ids")
        if record is None:
            return CancelOutcome.UNKNOWN
        pipe = self._redis.pipeline(transaction=True)
        pipe.sadd(k.batch_cancelled_key(batch_id), custom_id)
        pipe.expire(k.batch_cancelled_key(batch_id), self.config.record_ttl_s)
        pipe.smembers(k.batch_cancelled_key(batch_id))
        cancelled = {_decode(c) for c in pipe.execute()[2]}
        if not set(json.loads(record)) <= cancelled:
            return CancelOutcome.NOT_CANCELLABLE
        try:
            self._client.messages.batches.cancel(batch_id)
        except anthropic.APIStatusError as exc:
            log.warning("could not cancel batch %s: %s", batch_id, exc)
            return CancelOutcome.NOT_CANCELLABLE
        return CancelOutcome.BATCH_CANCELLED

    # ---- Submitting ---------------------------------------------------------------------------
    def due(self) -> bool:
        count = self.pending()
        if count == 0:
            return False
        if count >= self.config.max_requests:
            return True
        oldest = self._redis.zrange(k.BATCH_BUFFER_KEY, 0, 0, withscores=True)
        return bool(oldest) and float(oldest[0][1]) <= self._clock() - self.config.max_age_s

    def flush(self, force: bool = False) -> list[str]:
        """Send batches while the buffer is due (or, `force`, until it is empty); returns their ids.
        Another process holding the submit lock: nothing is sent now."""
        created: list[str] = []
        lock = _Lock(self._redis, k.BATCH_SUBMIT_LOCK_KEY, self.config.lock_ttl_s)
        if not lock.acquire():
            return created
        try:
            while self.pending() and (force or self.due()):
                batch_id = self._submit_one(lock)
                if batch_id is None:
                    break
                created.append(batch_id)
        finally:
            lock.release()
        return created

    def _submit_one(self, lock: _Lock) -> str | None:
        intent_id = secrets.token_hex(8)
        taken = int(self._take(keys=[k.BATCH_BUFFER_KEY, k.BATCH_BUFFER_REQUESTS_KEY, k.BATCH_INTENTS_KEY,
                                     k.batch_intent_key(intent_id)],
                               args=[self.config.max_requests, self._clock(), intent_id]))
        if taken == 0:
            return None
        self._pause(PAUSE_AFTER_INTENT)
        intent = self._read_intent(intent_id)
        assert intent is not None
        requests = [json.loads(body) for body in intent.requests.values()]
        try:
            batch = self._client.messages.batches.create(requests=requests, timeout=self.config.create_timeout_s)
        except anthropic.APIStatusError as exc:
            if exc.status_code >= 500 or exc.status_code in (408, 409, 429):
                # Perhaps created: the intent stays for reconcile to match or restore.
                log.warning("batch create failed (%s); intent %s is left for reconcile", exc.status_code, intent_id)
                return None
            # Refused as a whole: nothing was created, the requests go back to the buffer.
            log.error("batch create refused (%s): %s; %d requests back in the buffer", exc.status_code, exc, taken)
            self._restore(intent)
            raise
        except anthropic.APIConnectionError as exc:
            log.warning("batch create did not answer (%s); intent %s is left for reconcile", exc, intent_id)
            return None
        self._pause(PAUSE_AFTER_CREATE)
        if not lock.renew():
            log.warning("submit lock lost during create of %s; recording it anyway", batch.id)
        self._record(batch.id, intent)
        return batch.id

    def _record(self, batch_id: str, intent: _Intent) -> None:
        ttl = self.config.record_ttl_s
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(k.batch_record_key(batch_id), mapping={
            "custom_ids": json.dumps(sorted(intent.requests)), "intent_id": intent.intent_id,
            "recorded_at": self._clock()})
        pipe.expire(k.batch_record_key(batch_id), ttl)
        for custom_id in intent.requests:
            pipe.set(k.batch_location_key(custom_id), batch_id, ex=ttl)
        pipe.zadd(k.BATCH_ACTIVE_KEY, {batch_id: self._clock()})
        pipe.delete(k.batch_intent_key(intent.intent_id))
        pipe.zrem(k.BATCH_INTENTS_KEY, intent.intent_id)
        pipe.execute()

    def _restore(self, intent: _Intent) -> None:
        scores: dict[str | bytes, float] = {cid: intent.buffered_at.get(cid, intent.created_at)
                                            for cid in intent.requests}
        bodies: dict[str | bytes, str] = {cid: body for cid, body in intent.requests.items()}
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(k.BATCH_BUFFER_KEY, scores)
        pipe.hset(k.BATCH_BUFFER_REQUESTS_KEY, mapping=bodies)
        pipe.delete(k.batch_intent_key(intent.intent_id))
        pipe.zrem(k.BATCH_INTENTS_KEY, intent.intent_id)
        pipe.execute()

    def _read_intent(self, intent_id: str) -> _Intent | None:
        raw = {_decode(f): _decode(v) for f, v in self._redis.hgetall(k.batch_intent_key(intent_id)).items()}
        if not raw:
            return None
        requests = {f[2:]: v for f, v in raw.items() if f.startswith("r:")}
        buffered = {f[2:]: float(v) for f, v in raw.items() if f.startswith("t:")}
        return _Intent(intent_id, float(raw["created_at"]), requests, buffered)

    # ---- Reconciling after a crash ------------------------------------------------------------
    def reconcile(self) -> dict[str, int]:
        """Resolve intents left by a crashed submitter: adopt the batch that holds them, or put them
        back in the buffer when none can. Returns counts of adopted, restored and waiting intents."""
        counts = {"adopted": 0, "restored": 0, "waiting": 0}
        lock = _Lock(self._redis, k.BATCH_SUBMIT_LOCK_KEY, self.config.lock_ttl_s)
        if not lock.acquire():
            return counts
        try:
            members = self._redis.zrange(k.BATCH_INTENTS_KEY, 0, -1)
            intents = [i for i in (self._read_intent(_decode(m)) for m in members) if i is not None]
            if not intents:
                return counts
            candidates = self._unrecorded_batches(since=min(i.created_at for i in intents) - self.config.clock_skew_s)
            custom_ids_of: dict[str, set[str]] = {}
            for intent in intents:
                outcome = self._reconcile_one(intent, candidates, custom_ids_of)
                counts[outcome] += 1
                lock.renew()
        finally:
            lock.release()
        if counts["adopted"] or counts["restored"]:
            log.warning("batch reconcile: %s", counts)
        return counts

    def _unrecorded_batches(self, since: float) -> list[MessageBatch]:
        found = []
        for batch in self._client.messages.batches.list(limit=LIST_PAGE_SIZE):  # newest first, page by page
            if batch.created_at.timestamp() < since:
                break
            if not self._redis.exists(k.batch_record_key(batch.id)):
                found.append(batch)
        return found

    def _reconcile_one(self, intent: _Intent, candidates: list[MessageBatch],
                       custom_ids_of: dict[str, set[str]]) -> str:
        skew, window = self.config.clock_skew_s, self.config.lock_ttl_s
        wanted = set(intent.requests)
        possible = [b for b in candidates
                    if intent.created_at - skew <= b.created_at.timestamp() <= intent.created_at + window + skew
                    and _total(b) == len(wanted)]
        for batch in possible:
            if batch.processing_status != "ended":
                return "waiting"
        for batch in possible:
            if batch.id not in custom_ids_of:
                custom_ids_of[batch.id] = {line.custom_id for line in self._client.messages.batches.results(batch.id)}
            if custom_ids_of[batch.id] == wanted:
                self._record(batch.id, intent)
                return "adopted"
        self._restore(intent)
        return "restored"


def _total(batch: MessageBatch) -> int:
    c = batch.request_counts
    return c.processing + c.succeeded + c.errored + c.canceled + c.expired


class BatchPoller:
    """Hands every result of every recorded batch to `handle` once, as batches end."""

    def __init__(self, redis_client: redis.Redis, client: anthropic.Anthropic, handle: ResultHandler,
                 config: BatchConfig | None = None, *, pause: Callable[[str], None] | None = None) -> None:
        self._redis = redis_client
        self._client = client
        self._handle = handle
        self.config = config or BatchConfig()
        self._pause = pause or (lambda _point: None)

    def active(self) -> list[str]:
        return [_decode(b) for b in self._redis.zrange(k.BATCH_ACTIVE_KEY, 0, -1)]

    def poll(self) -> int:
        """Retrieve each active batch once; stream the results of those that ended. Returns how many
        results were handed to the handler."""
        handed = 0
        for batch_id in self.active():
            lock = _Lock(self._redis, k.batch_poll_lock_key(batch_id), self.config.poll_lock_ttl_s)
            if not lock.acquire():
                continue  # another poller streams it
            try:
                handed += self._poll_batch(batch_id, lock)
            except (anthropic.APIError, redis.RedisError) as exc:
                # One batch's trouble (a dropped results stream) must not hold up the others; what
                # was handled is marked, so the next poll resumes after it.
                log.warning("polling batch %s failed: %s; will resume on the next poll", batch_id, exc)
            finally:
                lock.release()
        return handed

    def _poll_batch(self, batch_id: str, lock: _Lock) -> int:
        raw = self._redis.hget(k.batch_record_key(batch_id), "custom_ids")
        if raw is None:
            log.error("active batch %s has no record (expired?); dropping it from the active set", batch_id)
            self._redis.zrem(k.BATCH_ACTIVE_KEY, batch_id)
            return 0
        expected = set(json.loads(raw))
        try:
            batch = self._client.messages.batches.retrieve(batch_id)
        except anthropic.NotFoundError:
            batch = None
        handled = {_decode(c) for c in self._redis.smembers(k.batch_handled_key(batch_id))}
        handed = 0
        if batch is None:
            # Gone at the provider (deleted or archived): its unhandled requests count as expired.
            lines: Iterable[BatchResult] = (BatchResult(batch_id, c, ResultType.EXPIRED) for c in sorted(expected))
        elif batch.processing_status != "ended":
            return 0
        else:
            lines = (BatchResult.from_sdk(batch_id, line) for line in self._client.messages.batches.results(batch_id))
        for result in lines:
            if result.custom_id in handled or result.custom_id not in expected:
                continue
            self._handle(result)
            self._pause(PAUSE_AFTER_HANDLE)
            pipe = self._redis.pipeline(transaction=True)
            mark_handled(pipe, batch_id, result.custom_id, self.config.record_ttl_s)
            pipe.execute()
            handled.add(result.custom_id)
            handed += 1
            self._pause(PAUSE_AFTER_MARK)
            lock.renew()
        if expected <= handled:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(k.BATCH_ACTIVE_KEY, batch_id)
            pipe.hset(k.batch_record_key(batch_id), "done_at", time.time())
            pipe.execute()
        else:
            log.error("batch %s ended without results for %d of its requests", batch_id, len(expected - handled))
        return handed

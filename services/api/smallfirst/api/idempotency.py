"""Idempotency keys with Stripe's semantics (the `Idempotency-Key` header of Stripe's API).

The first request with a key claims it with SET NX and a short TTL (the in-flight marker); what
is needed to replay its successful response is then stored under the key for `ttl_s` (the
tenant's `idempotency_ttl_s`, else the API's): the status code and the job ids (with a batch's
per-item errors), not a second copy of the jobs. A repeat with the same request gets that status
and the jobs as they are now, rendered by the route (`render`); a record written without a
renderer, or before this format, holds the whole body and is replayed byte for byte. The record's
bytes count against the tenant's stored-bytes quota, in the transaction that writes it
(quotas.account_record). A repeat with a different request is 422; a repeat while the first is
still being handled is 409. A request that fails before it wrote anything (validation, quota, an
outage before the store) releases the key, so the client may retry with it: nothing was created.
If the process dies while holding a key, the marker expires after `in_flight_ttl_s`.

The record of a request that creates jobs is stored in the same transaction as the jobs (the
handler asks its `Receipt` for that write), so that an unknown outcome never frees the key: when
the store fails after the write may have applied (a Redis error or timeout on EXEC), the key stays
claimed. Repeats get 409 with Retry-After until the outcome is known: either the transaction
applied and the key holds its record (replayed from then on), or it did not and the claim
expires after `in_flight_ttl_s` (by then no write of that request can still arrive), freeing the
key for a retry that creates the job once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel

from smallfirst.api.errors import ApiError
from smallfirst.common import constants as k
from smallfirst.common.quotas import account_record, idempotency_member
from smallfirst.common.store import RecordWrite

log = logging.getLogger(__name__)

MAX_KEY_CHARS = 255
REPLAYED_HEADER = "Idempotent-Replayed"

STATE_IN_FLIGHT = "in_flight"
# In flight, and its write failed in a way that leaves open whether it applied.
STATE_UNKNOWN = "outcome_unknown"
STATE_DONE = "done"
_CLAIM_TRIES = 3

# Delete the marker only if it is still ours (it may have expired and been claimed by another request).
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Mark our claim as of unknown outcome, keeping its TTL, only if it is still ours (the write that
# failed on our side may have applied and replaced it with the stored response).
_MARK_UNKNOWN_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL') end
return 0
"""


class IdempotencyRecord(BaseModel):
    state: str
    fingerprint: str
    # The claim of the request in flight, so that only it may release or complete the key.
    token: str = ""
    status: int | None = None
    # What the route needs to render the response again (job ids, a batch's item errors).
    replay: dict[str, Any] | None = None
    # The whole response body: records written before `replay` existed.
    body: str | None = None

    @classmethod
    def in_flight(cls, fingerprint: str, token: str | None = None) -> IdempotencyRecord:
        return cls(state=STATE_IN_FLIGHT, fingerprint=fingerprint, token=token or secrets.token_hex(8))


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    replayed: bool = False
    # Stored instead of `body` (see the module's docstring); None: the body is stored.
    replay: dict[str, Any] | None = None


Renderer = Callable[[dict[str, Any]], Awaitable[bytes]]


# A SET to make in the transaction that creates the request's effect (counted against the tenant).
StoredWrite = RecordWrite


@dataclass
class Receipt:
    """Given to a handler: lets it store its response in the same transaction as its effect."""

    redis_key: str | None
    fingerprint: str
    ttl_s: int
    tenant_id: str = ""
    idempotency_key: str = ""
    # Whether the route can render a `replay` again (else the whole body is stored).
    compact: bool = False
    prepared: StoredResponse | None = None

    def store_with_effect(self, status: int, body: bytes, replay: dict[str, Any] | None = None) -> StoredWrite | None:
        """The write to add to the effect's transaction (None without a key). From this call on, a
        failure of the handler leaves the outcome unknown and keeps the key claimed."""
        self.prepared = StoredResponse(status, body, replay=replay)
        if self.redis_key is None:
            return None
        record = _done_record(self.fingerprint, self.prepared, self.compact)
        return StoredWrite(self.redis_key, record, self.ttl_s, tenant=self.tenant_id or None,
                           quota_member=idempotency_member(self.idempotency_key))

    @property
    def committing(self) -> bool:
        return self.prepared is not None


def _done_record(request_fingerprint: str, response: StoredResponse, compact: bool) -> str:
    """The stored record of a handled request: its replay when the route can render it, else its body."""
    keep_replay = compact and response.replay is not None
    done = IdempotencyRecord(state=STATE_DONE, fingerprint=request_fingerprint, status=response.status,
                             replay=response.replay if keep_replay else None,
                             body=None if keep_replay else response.body.decode("utf-8"))
    return done.model_dump_json(exclude_none=True)


def fingerprint(method: str, path: str, payload: Any) -> str:
    """What makes two requests 'the same': method, path and the parsed body in canonical form
    (so key order and whitespace do not matter, but every value does)."""
    canonical = json.dumps([method.upper(), path, payload], sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise ApiError(422, "invalid_request",
                       f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters",
                       [{"field": f"header.{k.HEADER_IDEMPOTENCY_KEY}", "message": "invalid value",
                         "type": "value_error"}])


class IdempotencyStore:
    def __init__(self, client: aioredis.Redis, *, ttl_s: int, in_flight_ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.in_flight_ttl_s = in_flight_ttl_s
        self._release = client.register_script(_RELEASE_SCRIPT)
        self._mark_unknown = client.register_script(_MARK_UNKNOWN_SCRIPT)

    async def run(self, tenant_id: str, key: str | None, request_fingerprint: str,
                  handle: Callable[[Receipt], Awaitable[StoredResponse]], render: Renderer | None = None,
                  ttl_s: int | None = None) -> StoredResponse:
        """Run `handle` once per (tenant, key); repeats get its stored response (`render` turns a
        stored `replay` into the body again). `ttl_s`: the tenant's record TTL, else the API's."""
        ttl = ttl_s or self.ttl_s
        if key is None:
            return await handle(Receipt(None, request_fingerprint, ttl))
        check_key(key)
        redis_key = k.idempotency_key(tenant_id, key)
        claim_json = IdempotencyRecord.in_flight(request_fingerprint).model_dump_json()
        for _ in range(_CLAIM_TRIES):
            if await self.redis.set(redis_key, claim_json, nx=True, ex=self.in_flight_ttl_s):
                break
            stored = await self._stored(redis_key, key, request_fingerprint, render)
            if stored is not None:
                return stored
            # The holder released the key (its request failed) between our SET and GET: claim again.
        else:
            raise _in_flight(key)
        receipt = Receipt(redis_key, request_fingerprint, ttl, tenant_id=tenant_id, idempotency_key=key,
                          compact=render is not None)
        try:
            response = await handle(receipt)
        except ApiError:
            # Refused before or instead of any effect: nothing was created.
            await self._release(keys=[redis_key], args=[claim_json])
            raise
        except BaseException:
            if receipt.committing:
                # The effect's transaction may have applied: keep the key until that is known.
                await self._keep_unknown(redis_key, claim_json, request_fingerprint)
            else:
                # Nothing was created: free the key so that the client's retry is handled afresh.
                await self._release(keys=[redis_key], args=[claim_json])
            raise
        if receipt.committing and receipt.prepared == response:
            return response  # stored by the effect's own transaction
        record = _done_record(request_fingerprint, response, receipt.compact)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(redis_key, record, ex=ttl)
            account_record(pipe, tenant_id, idempotency_member(key), len(record.encode("utf-8")), time.time() + ttl)
            await pipe.execute()
        return response

    async def _keep_unknown(self, redis_key: str, claim_json: str, request_fingerprint: str) -> None:
        claim = IdempotencyRecord.model_validate_json(claim_json)
        unknown = IdempotencyRecord(state=STATE_UNKNOWN, fingerprint=request_fingerprint, token=claim.token)
        try:
            await self._mark_unknown(keys=[redis_key], args=[claim_json, unknown.model_dump_json()])
        except (redis.RedisError, OSError) as exc:
            # Redis is away: the claim stays as it is, which keeps the key reserved all the same.
            log.info("idempotency key %s: outcome unknown, claim kept (%s)", redis_key, exc)

    async def _stored(self, redis_key: str, key: str, request_fingerprint: str,
                      render: Renderer | None = None) -> StoredResponse | None:
        """The response to replay for a key someone holds; None if the key is free again."""
        raw = await self.redis.get(redis_key)
        if raw is None:
            return None
        record = IdempotencyRecord.model_validate_json(raw)
        if record.fingerprint != request_fingerprint:
            raise ApiError(422, "idempotency_key_reused",
                           "this Idempotency-Key was used with a different request; use a new key",
                           {"idempotency_key": key})
        if record.state == STATE_UNKNOWN:
            # Known by the claim's expiry at the latest: say when.
            ttl_s = await self.redis.ttl(redis_key)
            raise _outcome_unknown(key, max(1, int(ttl_s)))
        if record.state == STATE_IN_FLIGHT or record.status is None:
            raise _in_flight(key)
        if record.replay is not None and render is not None:
            return StoredResponse(status=record.status, body=await render(record.replay), replayed=True)
        if record.body is None:
            raise _in_flight(key)
        return StoredResponse(status=record.status, body=record.body.encode("utf-8"), replayed=True)


def _in_flight(key: str) -> ApiError:
    return ApiError(409, "idempotency_key_in_flight",
                    "a request with this Idempotency-Key is still being handled; retry shortly",
                    {"idempotency_key": key}, headers={k.HEADER_RETRY_AFTER: "1"})


def _outcome_unknown(key: str, retry_after_s: int) -> ApiError:
    return ApiError(409, "idempotency_key_in_flight",
                    "the first request with this Idempotency-Key failed before its outcome was known; "
                    f"retry after {retry_after_s} s to get its response, or to have it handled afresh",
                    {"idempotency_key": key, "outcome": "unknown", "retry_after_s": retry_after_s},
                    headers={k.HEADER_RETRY_AFTER: str(retry_after_s)})

"""Idempotency keys with Stripe's semantics (shared/REFERENCE.md, "Job APIs people already use").

The first request with a key claims it with SET NX and a short TTL (the in-flight marker); its
successful response is then stored under the key for `ttl_s` and replayed, byte for byte, to
every repeat with the same request. A repeat with a different request is 422; a repeat while the
first is still being handled is 409. A request that fails (validation, quota, outage) releases
the key, so the client may retry with it: nothing was created. If the process dies while holding
a key, the marker expires after `in_flight_ttl_s`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel

from smallfirst.api.errors import ApiError
from smallfirst.common import constants as k

MAX_KEY_CHARS = 255
REPLAYED_HEADER = "Idempotent-Replayed"

STATE_IN_FLIGHT = "in_flight"
STATE_DONE = "done"
_CLAIM_TRIES = 3

# Delete the marker only if it is still ours (it may have expired and been claimed by another request).
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class IdempotencyRecord(BaseModel):
    state: str
    fingerprint: str
    # The claim of the request in flight, so that only it may release or complete the key.
    token: str = ""
    status: int | None = None
    body: str | None = None

    @classmethod
    def in_flight(cls, fingerprint: str, token: str | None = None) -> IdempotencyRecord:
        return cls(state=STATE_IN_FLIGHT, fingerprint=fingerprint, token=token or secrets.token_hex(8))


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: bytes
    replayed: bool = False


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

    async def run(self, tenant_id: str, key: str | None, request_fingerprint: str,
                  handle: Callable[[], Awaitable[StoredResponse]]) -> StoredResponse:
        """Run `handle` once per (tenant, key); repeats get its stored response."""
        if key is None:
            return await handle()
        check_key(key)
        redis_key = k.idempotency_key(tenant_id, key)
        claim_json = IdempotencyRecord.in_flight(request_fingerprint).model_dump_json()
        for _ in range(_CLAIM_TRIES):
            if await self.redis.set(redis_key, claim_json, nx=True, ex=self.in_flight_ttl_s):
                break
            stored = await self._stored(redis_key, key, request_fingerprint)
            if stored is not None:
                return stored
            # The holder released the key (its request failed) between our SET and GET: claim again.
        else:
            raise _in_flight(key)
        try:
            response = await handle()
        except BaseException:
            # Nothing was created: free the key so that the client's retry is handled afresh.
            await self._release(keys=[redis_key], args=[claim_json])
            raise
        done = IdempotencyRecord(state=STATE_DONE, fingerprint=request_fingerprint, status=response.status,
                                 body=response.body.decode("utf-8"))
        await self.redis.set(redis_key, done.model_dump_json(), ex=self.ttl_s)
        return response

    async def _stored(self, redis_key: str, key: str, request_fingerprint: str) -> StoredResponse | None:
        """The response to replay for a key someone holds; None if the key is free again."""
        raw = await self.redis.get(redis_key)
        if raw is None:
            return None
        record = IdempotencyRecord.model_validate_json(raw)
        if record.fingerprint != request_fingerprint:
            raise ApiError(422, "idempotency_key_reused",
                           "this Idempotency-Key was used with a different request; use a new key",
                           {"idempotency_key": key})
        if record.state == STATE_IN_FLIGHT or record.status is None or record.body is None:
            raise _in_flight(key)
        return StoredResponse(status=record.status, body=record.body.encode("utf-8"), replayed=True)


def _in_flight(key: str) -> ApiError:
    return ApiError(409, "idempotency_key_in_flight",
                    "a request with this Idempotency-Key is still being handled; retry shortly",
                    {"idempotency_key": key}, headers={k.HEADER_RETRY_AFTER: "1"})

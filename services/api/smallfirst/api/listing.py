"""Walking a tenant's jobs newest first, for cursor pagination.

The index is the sorted set `tenant_jobs_key(tenant)`, scored by creation time in ms. A position
is (score, job id); members with the same score come in descending id order, as ZREVRANGEBYSCORE
returns them. Each step asks for the members strictly below the last position's score and then
completes the group of the last millisecond it saw, so neither jobs created during the walk nor
a batch of a thousand jobs sharing one millisecond can make it repeat or skip a job.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncGenerator, Sequence

import redis.asyncio as aioredis

from smallfirst.common import constants as k

Position = tuple[int, str]


# A cursor this API returns is about 60 characters; anything much longer was not made here.
MAX_CURSOR_CHARS = 512
# Scores are creation times in ms: below 2^53 (where a float score stops being exact).
MAX_SCORE = 2**53
MAX_ID_CHARS = 128


class InvalidCursor(ValueError):
    pass


def encode_cursor(position: Position) -> str:
    raw = json.dumps({"s": position[0], "id": position[1]}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not a cursor value")


def decode_cursor(cursor: str) -> Position:
    """The position a cursor of `encode_cursor` names; InvalidCursor for anything else (never an
    exception of another kind: the cursor is untrusted input)."""
    if not cursor or len(cursor) > MAX_CURSOR_CHARS or not cursor.isascii():
        raise InvalidCursor(cursor)
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        # NaN and Infinity are not JSON; nesting is refused by the shape check below, but a
        # string of brackets could exhaust the recursion limit while parsing, hence RecursionError.
        data = json.loads(raw, parse_constant=_refuse_constant)
    except (binascii.Error, ValueError, RecursionError, UnicodeDecodeError) as exc:
        raise InvalidCursor(cursor) from exc
    if not isinstance(data, dict) or set(data) != {"s", "id"}:
        raise InvalidCursor(cursor)
    score, job_id = data["s"], data["id"]
    if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score < MAX_SCORE:
        raise InvalidCursor(cursor)
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_ID_CHARS or not job_id.isprintable():
        raise InvalidCursor(cursor)
    return score, job_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobIndex:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def walk(self, tenant_id: str, *, after: Position | None = None, max_score: int | None = None,
                   min_score: int | None = None, chunk: int = 100) -> AsyncGenerator[list[Position], None]:
        """Positions in descending order, strictly after `after`, within [min_score, max_score]."""
        key = k.tenant_jobs_key(tenant_id)
        upper = "+inf" if max_score is None else str(max_score)
        lower = "-inf" if min_score is None else str(min_score)
        if after is not None:
            score, last_id = after
            in_range = (max_score is None or score <= max_score) and (min_score is None or score >= min_score)
            if in_range:
                rest = [p for p in await self._group(key, score) if p[1] < last_id]
                if rest:
                    yield rest
            if max_score is None or score <= max_score:
                upper = f"({score}"
        while True:
            entries: Sequence[tuple[bytes | str, float]] = await self.redis.zrevrangebyscore(
                key, upper, lower, start=0, num=chunk, withscores=True)
            if not entries:
                return
            positions = [(int(score), _text(member)) for member, score in entries]
            if len(entries) == chunk:
                # The chunk may end inside one millisecond's group of jobs: take the whole group.
                edge = positions[-1][0]
                positions = [p for p in positions if p[0] != edge] + await self._group(key, edge)
            yield positions
            if len(entries) < chunk:
                return
            upper = f"({positions[-1][0]}"

    async def _group(self, key: str, score: int) -> list[Position]:
        members = await self.redis.zrangebyscore(key, score, score)
        return [(score, member) for member in sorted((_text(m) for m in members), reverse=True)]

    async def forget(self, tenant_id: str, job_ids: Sequence[str]) -> None:
        """Drop ids whose job records expired (the index outlives them until its own TTL)."""
        if job_ids:
            await self.redis.zrem(k.tenant_jobs_key(tenant_id), *job_ids)

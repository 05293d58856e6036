"""Dead letters: the jobs of a tenant that failed for a reason a person can act on, and the queue
messages no worker could decode, each with its reason, until it is replayed or expires.

Whether a failure dead-letters is decided by the outcome function (`outcome.DEAD_LETTER_REASONS`,
carried on the job as `Job.dead_letter`); the job store writes the entry in the same transaction
as the failure and removes it in the same transaction as the replay (`queue_entry_writes`), so the
list and the jobs never disagree. Keys: `constants.dead_letters_key` (ids scored by when they
failed, in ms) and `constants.dead_letter_entries_key` (the entries' JSON), both with the job
retention as TTL.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from pydantic import BaseModel, Field

from smallfirst.common import constants as k
from smallfirst.common.jobs import Job

log = logging.getLogger(__name__)

# The reason of an entry that is a queue message, not a job.
REASON_UNDECODABLE = "undecodable_message"
# At most this much of an undecodable message's body is kept (enough to recognise it).
UNDECODABLE_BODY_MAX_CHARS = 2000


class DeadLetter(BaseModel):
    """One entry: the job (or message), why it is here, and what the failure said."""

    object: str = "dead_letter"
    id: str = Field(description="The job's id (a replay names it), or `msg_...` for an undecodable message.")
    job_id: str | None = Field(default=None, description="The job to replay; None for an undecodable message.")
    tenant: str
    task: str | None = None
    reason: str = Field(description="Why it is here: the job's error code, or `undecodable_message`.")
    message: str = ""
    details: dict[str, Any] = Field(default_factory=dict)
    failed_at: float = Field(description="When the job failed (Unix s).")
    attempts: int = 0
    replays: int = Field(default=0, description="How often the job was replayed before this failure.")


def entry_of(job: Job) -> DeadLetter:
    assert job.dead_letter is not None, "only a dead-lettered job has an entry"
    return DeadLetter(id=job.id, job_id=job.id, tenant=job.tenant, task=job.task, reason=job.dead_letter,
                      message=job.error.message if job.error is not None else "",
                      details=dict(job.error.details) if job.error is not None else {},
                      failed_at=job.ended_at or job.updated_at, attempts=len(job.attempts), replays=job.replays)


def score_ms(at_s: float) -> int:
    return int(at_s * 1000)


def queue_entry_writes(pipe: Any, old: Job | None, new: Job, retention_s: int) -> None:
    """The dead-letter writes of one job transition, on a pipeline already in MULTI (sync or asyncio)."""
    if new.dead_letter is not None and (old is None or old.dead_letter is None):
        entry = entry_of(new)
        pipe.hset(k.dead_letter_entries_key(new.tenant), new.id, entry.model_dump_json())
        pipe.zadd(k.dead_letters_key(new.tenant), {new.id: score_ms(entry.failed_at)})
        pipe.expire(k.dead_letter_entries_key(new.tenant), retention_s)
        pipe.expire(k.dead_letters_key(new.tenant), retention_s)
    elif old is not None and old.dead_letter is not None and new.dead_letter is None:
        pipe.hdel(k.dead_letter_entries_key(new.tenant), new.id)
        pipe.zrem(k.dead_letters_key(new.tenant), new.id)


def record_undecodable(client: redis.Redis, body: object, error: str, *, queue: str | None,
                       retention_s: int) -> DeadLetter:
    """Keep a queue message that no worker can decode (its body cut short) under its reason."""
    now = time.time()
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else repr(body)
    entry = DeadLetter(id=f"msg_{time.time_ns():x}", tenant=k.UNDECODABLE_MESSAGES_TENANT,
                       reason=REASON_UNDECODABLE, message=error[:500],
                       details={"queue": queue, "body": text[:UNDECODABLE_BODY_MAX_CHARS]}, failed_at=now)
    tenant = k.UNDECODABLE_MESSAGES_TENANT
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(k.dead_letter_entries_key(tenant), entry.id, entry.model_dump_json())
        pipe.zadd(k.dead_letters_key(tenant), {entry.id: score_ms(now)})
        pipe.expire(k.dead_letter_entries_key(tenant), retention_s)
        pipe.expire(k.dead_letters_key(tenant), retention_s)
        pipe.execute()
    return entry


def read_entries(client: redis.Redis, tenant: str, *, limit: int = 100) -> list[DeadLetter]:
    """A tenant's newest entries (for operators and the CLI, blocking client)."""
    ids = client.zrevrange(k.dead_letters_key(tenant), 0, max(0, limit - 1))
    if not ids:
        return []
    raws = client.hmget(k.dead_letter_entries_key(tenant), ids)
    return [DeadLetter.model_validate_json(raw) for raw in raws if raw is not None]

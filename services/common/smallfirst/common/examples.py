"""The example memory of a task that learns: what the frontier (or a person) answered for an input.

Every frontier answer of a classify task that learns (an escalation, a frontier-routed job, a shadow
sample) and every correction by feedback becomes an example: the input text, the label, its source,
the job, the tenant, the frontier model and the time. The input's embedding under the task's small
model is added by the small tier (the frontier pool has no embedding model): the small worker keeps
the vector it computed for the job's input a few hours (`constants.input_vector_key`), and the
trainer embeds whatever is still missing. Seeds (the catalog's examples) are not stored here; the
trainer takes them from the catalog.

Bounded: at most `max_examples_per_label` per label (the oldest dropped), none older than
`retention_days`, and every key expires after the retention unless written again. One example per
job: a later answer for the same job (a feedback correction of a frontier answer) replaces it.

Pure JSON and Redis (no numpy): the API and the frontier pool use it as well as the small tier.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Task
from smallfirst.common.jobs import Job


class ExampleSource(StrEnum):
    SEED = "seed"  # the catalog's examples (never stored here)
    FRONTIER = "frontier"  # an escalated or frontier-routed job's frontier answer
    SHADOW = "shadow"  # the frontier's answer to a job the small tier kept (an unbiased sample)
    FEEDBACK = "feedback"  # a person's correction


@dataclass(frozen=True)
class Example:
    id: str
    task: str
    embedding_model: str
    text: str
    label: str
    source: ExampleSource
    job_id: str
    tenant: str
    model: str  # who answered: the frontier model, or "feedback"
    created_at: float
    # False: counted, never trains a head shared by other tenants (untrusted feedback).
    trusted: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Example:
        data = json.loads(raw)
        data["source"] = ExampleSource(data["source"])
        return cls(**data)

    def export(self) -> dict[str, Any]:
        """One line of the distillation export."""
        return {"text": self.text, "answer": {"label": self.label}, "source": self.source.value,
                "job_id": self.job_id, "model": self.model, "created_at": self.created_at}


# KEYS: examples, vectors, by_time, by_label, added, tenant_examples, old_label_key (or "")
# ARGV: id, json, created_at, cap, ttl_s, tenant_member, vector (or "")
# Records one example, replacing an earlier one of the same id (whose label may differ), then
# drops the label's oldest examples beyond the cap, all at once so the cap holds under concurrency.
_RECORD = """
local id = ARGV[1]
if KEYS[7] ~= '' and KEYS[7] ~= KEYS[4] then redis.call('ZREM', KEYS[7], id) end
redis.call('HSET', KEYS[1], id, ARGV[2])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], id, ARGV[7]) end
redis.call('ZADD', KEYS[3], ARGV[3], id)
redis.call('ZADD', KEYS[4], ARGV[3], id)
local excess = redis.call('ZCARD', KEYS[4]) - tonumber(ARGV[4])
local dropped = 0
if excess > 0 then
  local old = redis.call('ZRANGE', KEYS[4], 0, excess - 1)
  for _, victim in ipairs(old) do
    redis.call('ZREM', KEYS[4], victim)
    redis.call('ZREM', KEYS[3], victim)
    redis.call('HDEL', KEYS[1], victim)
    redis.call('HDEL', KEYS[2], victim)
    dropped = dropped + 1
  end
end
redis.call('INCR', KEYS[5])
redis.call('SADD', KEYS[6], ARGV[6])
local ttl = tonumber(ARGV[5])
for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ttl) end
return dropped
"""


def _member(task: str, model: str, example_id: str) -> str:
    return f"{task}|{model}|{example_id}"


def learns_from(job: Job, task: Task) -> bool:
    """Whether `job`'s answers may become examples of `task`: the task learns, the job and its
    tenant did not opt out, and a local-only input is kept only where the task allows it."""
    if not task.learns or not job.learning:
        return False
    return not (job.local_only or task.routing.local_only) or task.learning.keep_local_only


class ExampleMemory:
    def __init__(self, client: redis.Redis, *, clock: Any = time.time) -> None:
        self.redis = client
        self.clock = clock
        self._record = client.register_script(_RECORD)

    # ---- writing --------------------------------------------------------------------------------
    def record(self, task: Task, job: Job, label: str, source: ExampleSource, *, model: str,
               trusted: bool = True, vector: bytes | None = None) -> Example | None:
        """Keep `label` as the answer to `job`'s input; None when the job may not teach the task
        (see `learns_from`) or the label is not one of the task's."""
        if not learns_from(job, task) or label not in task.label_names:
            return None
        embedding_model = task.small.model
        text = "\n".join(str(job.input.get(name, "")) for name in task.input_fields)
        example = Example(id=job.id, task=task.name, embedding_model=embedding_model, text=text, label=label,
                          source=source, job_id=job.id, tenant=job.tenant, model=model,
                          created_at=float(self.clock()), trusted=trusted)
        previous = self.get(task, job.id)
        old_label_key = (k.examples_by_label_key(task.name, embedding_model, previous.label)
                         if previous is not None else "")
        self._record(
            keys=[k.examples_key(task.name, embedding_model), k.examples_vectors_key(task.name, embedding_model),
                  k.examples_by_time_key(task.name, embedding_model),
                  k.examples_by_label_key(task.name, embedding_model, label),
                  k.examples_added_key(task.name, embedding_model), k.tenant_examples_key(job.tenant),
                  old_label_key],
            args=[example.id, example.to_json(), example.created_at, task.learning.max_examples_per_label,
                  retention_s(task), _member(task.name, embedding_model, example.id), vector or b""])
        return example

    def set_vectors(self, task: Task, vectors: dict[str, bytes]) -> None:
        """Store the embeddings of examples (by id) that were recorded without one."""
        if vectors:
            key = k.examples_vectors_key(task.name, task.small.model)
            self.redis.hset(key, mapping=vectors)  # type: ignore[arg-type]
            self.redis.expire(key, retention_s(task))

    # ---- reading --------------------------------------------------------------------------------
    def get(self, task: Task, example_id: str) -> Example | None:
        raw = self.redis.hget(k.examples_key(task.name, task.small.model), example_id)
        return Example.from_json(raw) if isinstance(raw, bytes | str) else None

    def all(self, task: Task) -> list[Example]:
        """Every example of `task` within its retention, oldest first (older ones are dropped here)."""
        self.prune(task)
        model = task.small.model
        ids = [i.decode() if isinstance(i, bytes) else str(i)
               for i in self.redis.zrange(k.examples_by_time_key(task.name, model), 0, -1)]
        if not ids:
            return []
        raws = self.redis.hmget(k.examples_key(task.name, model), ids)
        return [Example.from_json(raw) for raw in raws if isinstance(raw, bytes | str)]

    def vectors(self, task: Task, ids: Sequence[str]) -> list[bytes | None]:
        if not ids:
            return []
        raws = self.redis.hmget(k.examples_vectors_key(task.name, task.small.model), list(ids))
        return [raw if isinstance(raw, bytes) and raw else None for raw in raws]

    def added(self, task: Task) -> int:
        raw = self.redis.get(k.examples_added_key(task.name, task.small.model))
        return int(raw) if raw is not None else 0

    def counts(self, task: Task) -> dict[str, dict[str, int]]:
        """Examples per source and per label (what `GET /v1/tasks/{task}/model` shows)."""
        by_source: dict[str, int] = {}
        by_label: dict[str, int] = {}
        for example in self.all(task):
            by_source[example.source.value] = by_source.get(example.source.value, 0) + 1
            by_label[example.label] = by_label.get(example.label, 0) + 1
        return {"by_source": by_source, "by_label": by_label}

    def export(self, task: Task) -> Iterator[dict[str, Any]]:
        for example in self.all(task):
            yield example.export()

    # ---- forgetting -----------------------------------------------------------------------------
    def prune(self, task: Task) -> int:
        """Drop the examples older than the task's retention; how many were dropped."""
        model = task.small.model
        cutoff = float(self.clock()) - retention_s(task)
        old = self.redis.zrangebyscore(k.examples_by_time_key(task.name, model), "-inf", cutoff)
        for raw in old:
            self._forget(task.name, model, raw.decode() if isinstance(raw, bytes) else str(raw))
        return len(old)

    def delete_tenant(self, tenant_id: str) -> int:
        """Remove every example of a tenant (its data is being deleted); how many were removed."""
        members = self.redis.smembers(k.tenant_examples_key(tenant_id))
        removed = 0
        for raw in members:
            task, model, example_id = (raw.decode() if isinstance(raw, bytes) else str(raw)).split("|", 2)
            removed += self._forget(task, model, example_id)
        self.redis.delete(k.tenant_examples_key(tenant_id))
        return removed

    def _forget(self, task: str, model: str, example_id: str) -> int:
        raw = self.redis.hget(k.examples_key(task, model), example_id)
        if raw is None:
            self.redis.zrem(k.examples_by_time_key(task, model), example_id)
            return 0
        example = Example.from_json(raw)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(k.examples_key(task, model), example_id)
            pipe.hdel(k.examples_vectors_key(task, model), example_id)
            pipe.zrem(k.examples_by_time_key(task, model), example_id)
            pipe.zrem(k.examples_by_label_key(task, model, example.label), example_id)
            pipe.srem(k.tenant_examples_key(example.tenant), _member(task, model, example_id))
            pipe.execute()
        return 1


def retention_s(task: Task) -> int:
    return max(1, int(task.learning.retention_days * 86400))

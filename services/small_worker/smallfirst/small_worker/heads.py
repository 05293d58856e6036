"""A task's trained head: input vectors -> label probabilities, and how novel an input is.

The trainer (trainer.py) fits a multinomial logistic regression over the embeddings of a task's
seeds and learned examples and stores it in Redis (`constants.head_key`: `meta` JSON and `weights`
npz) with a version number (`constants.head_version_key`). Every small worker keeps the live head
in memory and polls the version key at most every `poll_interval_s`, so a new head is answering
within seconds of going live, without a restart.

Novelty is one minus the cosine similarity between the input and the nearest training example; an
input whose novelty is above the head's calibrated `novelty_floor` is unlike anything the task has
seen and escalates even when the head is confident.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from smallfirst.common import constants as k

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 2.0


@dataclass(frozen=True)
class TrainedHead:
    version: int
    classes: tuple[str, ...]
    weights: np.ndarray  # (classes, dimensions) float32
    bias: np.ndarray  # (classes,) float32
    # Unit rows: the training examples, for the novelty score.
    support: np.ndarray  # (examples, dimensions) float32
    threshold: float
    novelty_floor: float
    meta: dict[str, Any] = field(default_factory=dict)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """(n, dimensions) -> (n, classes): the softmax of the linear scores."""
        logits = vectors.astype(np.float32) @ self.weights.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        result: np.ndarray = weights / weights.sum(axis=1, keepdims=True)
        return result

    def novelty(self, vectors: np.ndarray) -> np.ndarray:
        """(n, dimensions) -> (n,): 1 - cosine similarity to the nearest training example."""
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.maximum(norms, 1e-12)
        result: np.ndarray = 1.0 - (unit.astype(np.float32) @ self.support.T).max(axis=1)
        return result

    # ---- storage --------------------------------------------------------------------------------
    def to_redis(self) -> dict[str, bytes]:
        buffer = io.BytesIO()
        np.savez(buffer, weights=self.weights, bias=self.bias, support=self.support.astype(np.float16))
        meta = {**self.meta, "version": self.version, "classes": list(self.classes), "threshold": self.threshold,
                "novelty_floor": self.novelty_floor}
        return {"meta": json.dumps(meta).encode(), "weights": buffer.getvalue()}

    @classmethod
    def from_redis(cls, fields: dict[bytes, bytes]) -> TrainedHead:
        meta = json.loads(fields[b"meta"])
        arrays = np.load(io.BytesIO(fields[b"weights"]))
        return cls(version=int(meta["version"]), classes=tuple(meta["classes"]),
                   weights=arrays["weights"].astype(np.float32), bias=arrays["bias"].astype(np.float32),
                   support=arrays["support"].astype(np.float32), threshold=float(meta["threshold"]),
                   novelty_floor=float(meta["novelty_floor"]), meta=meta)


def load_head(client: redis.Redis, task: str, model: str) -> TrainedHead | None:
    fields = client.hgetall(k.head_key(task, model))
    if not fields or b"meta" not in fields or b"weights" not in fields:
        return None
    return TrainedHead.from_redis(fields)


def publish_head(client: redis.Redis, task: str, model: str, head: TrainedHead) -> None:
    """Make `head` the live one: its fields and its version number in one transaction."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(k.head_key(task, model))
        pipe.hset(k.head_key(task, model), mapping=head.to_redis())  # type: ignore[arg-type]
        pipe.set(k.head_version_key(task, model), head.version)
        pipe.incr(k.head_published_key(task, model))
        pipe.execute()


class HeadCache:
    """The live heads of this process, refreshed from Redis when their version changes. Thread-safe."""

    def __init__(self, client: redis.Redis, *, poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        self._poll_interval_s = poll_interval_s
        self._clock = clock
        self._heads: dict[tuple[str, str], TrainedHead | None] = {}
        self._checked_at: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def get(self, task: str, model: str) -> TrainedHead | None:
        key = (task, model)
        now = self._clock()
        if key in self._heads and now - self._checked_at.get(key, -1e18) < self._poll_interval_s:
            return self._heads[key]
        with self._lock:
            if key in self._heads and now - self._checked_at.get(key, -1e18) < self._poll_interval_s:
                return self._heads[key]
            self._checked_at[key] = now
            current = self._heads.get(key)
            try:
                raw = self._redis.get(k.head_version_key(task, model))
                version = int(raw) if raw is not None else None
                if version is None:
                    self._heads[key] = None
                elif current is None or current.version != version:
                    head = load_head(self._redis, task, model)
                    self._heads[key] = head
                    if head is not None:
                        log.info("task %s: head version %d is live (threshold %.3f)", task, head.version,
                                 head.threshold)
            except redis.RedisError as exc:
                # Keep answering with the head already loaded; the next poll tries again.
                log.warning("task %s: cannot check the head's version: %s", task, exc)
                self._heads.setdefault(key, None)
            return self._heads[key]


def remember_input_vector(client: redis.Redis, task: str, model: str, text_sha256: str, vector: np.ndarray) -> None:
    """Keep the input's vector briefly, so that the trainer can use it if the job escalates, and
    among the task's recent inputs, on which the trainer estimates a head's frontier share."""
    raw = vector.astype(np.float32).tobytes()
    with client.pipeline(transaction=False) as pipe:
        pipe.set(k.input_vector_key(model, text_sha256), raw, ex=k.INPUT_VECTOR_TTL_S)
        pipe.lpush(k.recent_inputs_key(task, model), raw)
        pipe.ltrim(k.recent_inputs_key(task, model), 0, k.RECENT_INPUTS_KEPT - 1)
        pipe.expire(k.recent_inputs_key(task, model), k.INPUT_VECTOR_TTL_S)
        pipe.execute()

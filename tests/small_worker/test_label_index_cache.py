"""The label index cache of a small-worker process (on a real Redis): a task's index is built once
and reused by every job, and a changed label set (a reloaded catalog) gets an index of its own."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import redis

from smallfirst.common.catalog import Label
from smallfirst.small_worker.inference_client import Embeddings
from smallfirst.small_worker.label_index import LabelIndexCache

DIMENSIONS = 8
MODEL = "test-embedder"


class CountingEmbedder:
    """Stands in for the inference service: a fixed unit vector per text, and the texts asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def embed(self, model: str, texts: Sequence[str], *, truncate: bool = False,
              timeout_s: float | None = None) -> Embeddings:
        self.asked.extend(texts)
        rows = [np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).standard_normal(DIMENSIONS)
                for t in texts]
        vectors = np.array([row / np.linalg.norm(row) for row in rows], dtype=np.float32)
        return Embeddings(vectors=vectors, prompt_tokens=len(texts), model=model)


def labels(*names: str) -> tuple[Label, ...]:
    return tuple(Label(name=name, description=f"about {name}", examples=(f"an example of {name}",)) for name in names)


def test_every_job_of_a_task_gets_the_one_index_built_for_its_labels(redis_url: str) -> None:
    # given: a worker's cache, and a task's labels
    embedder = CountingEmbedder()
    cache = LabelIndexCache(embedder, redis.Redis.from_url(redis_url))  # type: ignore[arg-type]
    task_labels = labels("refund", "delivery", "login")

    # when: many jobs of the task ask for its index
    indexes = [cache.get(MODEL, task_labels, DIMENSIONS) for _ in range(50)]

    # then: one index, built from one pass over the label texts
    assert all(index is indexes[0] for index in indexes)
    assert len(embedder.asked) == 6
    assert indexes[0].names == ("refund", "delivery", "login")


def test_a_reloaded_catalog_with_other_labels_gets_a_new_index_and_the_same_labels_reuse_the_old(
        redis_url: str) -> None:
    # given: the index of a task's labels, built
    embedder = CountingEmbedder()
    cache = LabelIndexCache(embedder, redis.Redis.from_url(redis_url))  # type: ignore[arg-type]
    first = cache.get(MODEL, labels("refund", "delivery"), DIMENSIONS)

    # when: a reloaded catalog holds the same labels (new objects), then a label more
    same = cache.get(MODEL, labels("refund", "delivery"), DIMENSIONS)
    changed = cache.get(MODEL, labels("refund", "delivery", "login"), DIMENSIONS)

    # then: equal labels share the index; the changed set has its own, scored over all its labels
    assert same is first
    assert changed is not first
    assert changed.names == ("refund", "delivery", "login")
    assert changed.label_scores(changed.vectors[-1]).argmax() == 2
    # and only the new label's texts were embedded (the others come from the Redis cache)
    assert sorted(embedder.asked[4:]) == ["about login", "an example of login"]


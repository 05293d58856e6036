"""The embeddings of a classify task's label texts, computed once per model and cached in Redis.

A label is represented by its description and its seed examples (or, lacking both, its name made
readable). Every text's vector is stored under `constants.embedding_cache_key(model, sha256)`,
shared by every worker; each worker process also keeps the assembled matrix of a task's labels
in memory, so a job costs one embedding call (its input) and no Redis reads.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import redis

from smallfirst.common import constants
from smallfirst.common.catalog import Label
from smallfirst.small_worker.inference_client import InferenceClient, InferenceFailed

log = logging.getLogger(__name__)

# Texts per Embed call when filling the cache.
EMBED_BATCH = 128
# Label sets whose digest is remembered (a catalog's tasks; forgotten all at once past this, as after
# many catalog reloads).
MAX_REMEMBERED_LABEL_SETS = 1024


def label_texts(label: Label) -> tuple[str, ...]:
    texts = tuple(t for t in (label.description, *label.examples) if t.strip())
    return texts or (label.name.replace("_", " ").replace("-", " "),)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LabelIndex:
    """One row per label text; `owners[i]` is the index (in `names`) of the label of row i."""

    names: tuple[str, ...]
    vectors: np.ndarray  # (texts, dimensions) float32, unit rows
    owners: np.ndarray  # (texts,) int

    @property
    def dimensions(self) -> int:
        return int(self.vectors.shape[1])

    @cached_property
    def _runs(self) -> np.ndarray | None:
        """Where each label's rows start, when every label's rows are one run in label order (as
        `LabelIndexCache` builds them): then a label's best score is one `maximum.reduceat`."""
        owners = self.owners
        if owners.size == 0 or np.any(np.diff(owners) < 0):
            return None
        starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        if not np.array_equal(owners[starts], np.arange(len(self.names))):
            return None
        return starts

    def label_scores(self, queries: np.ndarray) -> np.ndarray:
        """Per label, the best cosine similarity between a query and any of the label's texts.

        `queries`: one vector (dimensions,) -> (labels,), or a matrix (queries, dimensions) ->
        (queries, labels), scored with one matrix product.
        """
        matrix = np.atleast_2d(queries).astype(np.float32, copy=False)
        similarities = matrix @ self.vectors.T  # (queries, texts)
        runs = self._runs
        if runs is not None:
            scores = np.maximum.reduceat(similarities, runs, axis=1)
        else:
            scores = np.full((matrix.shape[0], len(self.names)), -1.0, dtype=np.float32)
            for row in range(matrix.shape[0]):
                np.maximum.at(scores[row], self.owners, similarities[row])
        return scores[0] if queries.ndim == 1 else scores


class LabelIndexCache:
    """Thread-safe: concurrent jobs of a task wait for the one thread that builds its index."""

    def __init__(self, client: InferenceClient, cache: redis.Redis, ttl_s: int | None = 30 * 24 * 3600,
                 timeout_s: float = 120.0) -> None:
        self._client = client
        self._cache = cache
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._indexes: dict[tuple[str, str], LabelIndex] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._guard = threading.Lock()
        self._fingerprints: dict[int, tuple[Sequence[Label], list[tuple[str, ...]], str]] = {}

    def get(self, model: str, labels: Sequence[Label], dimensions: int) -> LabelIndex:
        """The index of `labels` under `model`, whose vectors have `dimensions` components.

        Cached vectors of another width are recomputed: the model behind the name was replaced.
        """
        texts_by_label, fingerprint = self._fingerprint(labels)
        key = (model, fingerprint)
        index = self._indexes.get(key)
        if index is not None and index.dimensions == dimensions:
            return index
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            index = self._indexes.get(key)
            if index is None or index.dimensions != dimensions:
                index = self._build(model, labels, texts_by_label, dimensions)
                self._indexes[key] = index
        return index

    def _fingerprint(self, labels: Sequence[Label]) -> tuple[list[tuple[str, ...]], str]:
        """The labels' texts and their digest, remembered for the very object a task holds: the
        digest hashes every label text (2,772 of them in a 308-label task), once per catalog load
        rather than once per job."""
        known = self._fingerprints.get(id(labels))
        if known is not None and known[0] is labels:
            return known[1], known[2]
        texts_by_label = [label_texts(label) for label in labels]
        fingerprint = text_digest(repr([(label.name, texts) for label, texts in zip(labels, texts_by_label,
                                                                                     strict=True)]))
        with self._guard:
            if len(self._fingerprints) >= MAX_REMEMBERED_LABEL_SETS:
                self._fingerprints.clear()
            # The entry holds the object itself, so its id cannot be reused while the entry lives.
            self._fingerprints[id(labels)] = (labels, texts_by_label, fingerprint)
        return texts_by_label, fingerprint

    def _build(self, model: str, labels: Sequence[Label], texts_by_label: list[tuple[str, ...]],
               dimensions: int) -> LabelIndex:
        texts = list(dict.fromkeys(t for texts in texts_by_label for t in texts))
        vectors = self._vectors(model, texts, dimensions)
        row_of = {text: row for row, text in enumerate(texts)}
        rows = [row_of[t] for texts in texts_by_label for t in texts]
        owners = np.array([i for i, texts in enumerate(texts_by_label) for _ in texts], dtype=np.int64)
        return LabelIndex(names=tuple(label.name for label in labels), vectors=vectors[rows], owners=owners)

    def _vectors(self, model: str, texts: list[str], dimensions: int) -> np.ndarray:
        keys = [constants.embedding_cache_key(model, text_digest(t)) for t in texts]
        cached = self._cache.mget(keys)
        found: list[np.ndarray | None] = [
            np.frombuffer(raw, dtype=np.float32)
            if isinstance(raw, bytes) and len(raw) == 4 * dimensions else None
            for raw in cached
        ]
        missing = [i for i, v in enumerate(found) if v is None]
        if missing:
            log.info("embedding %d label text(s) of %s (%d cached)", len(missing), model, len(texts) - len(missing))
        for start in range(0, len(missing), EMBED_BATCH):
            batch = missing[start:start + EMBED_BATCH]
            result = self._client.embed(model, [texts[i] for i in batch], truncate=True, timeout_s=self._timeout_s)
            pipe = self._cache.pipeline(transaction=False)
            for i, vector in zip(batch, result.vectors, strict=True):
                if vector.shape[0] != dimensions:
                    raise InferenceFailed(f"{model} returned {vector.shape[0]} dimensions, expected {dimensions}")
                found[i] = vector
                pipe.set(keys[i], vector.tobytes(), ex=self._ttl_s)
            pipe.execute()
        return np.stack([v for v in found if v is not None]).astype(np.float32)

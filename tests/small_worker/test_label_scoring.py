"""Batched scoring: a matrix of queries scored against a label index with one matrix product gives
each query the scores it would have alone (a label's best cosine over its texts)."""

from __future__ import annotations

import numpy as np

from smallfirst.small_worker.executor import HeadScores, LabelProbabilities
from smallfirst.small_worker.heads import TrainedHead
from smallfirst.small_worker.label_index import LabelIndex


def unit_rows(rng: np.random.Generator, rows: int, dimensions: int = 8) -> np.ndarray:
    matrix = rng.standard_normal((rows, dimensions)).astype(np.float32)
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def best_per_label(index: LabelIndex, query: np.ndarray) -> list[float]:
    similarities = index.vectors @ query
    return [float(similarities[index.owners == label].max()) for label in range(len(index.names))]


def test_a_batch_of_queries_gets_the_scores_each_would_get_alone() -> None:
    # given: three labels with 1, 4 and 2 texts, and five queries
    rng = np.random.default_rng(7)
    index = LabelIndex(names=("a", "b", "c"), vectors=unit_rows(rng, 7), owners=np.array([0, 1, 1, 1, 1, 2, 2]))
    queries = unit_rows(rng, 5)

    # when
    scores = index.label_scores(queries)

    # then
    assert scores.shape == (5, 3)
    for row, query in enumerate(queries):
        assert np.allclose(scores[row], best_per_label(index, query), atol=1e-6)
        assert np.allclose(index.label_scores(query), scores[row], atol=1e-6)


def test_labels_whose_texts_are_not_in_one_run_are_scored_the_same() -> None:
    # given: an index whose rows interleave the labels' texts
    rng = np.random.default_rng(11)
    index = LabelIndex(names=("a", "b"), vectors=unit_rows(rng, 5), owners=np.array([1, 0, 1, 0, 0]))
    queries = unit_rows(rng, 3)

    # when
    scores = index.label_scores(queries)

    # then
    for row, query in enumerate(queries):
        assert np.allclose(scores[row], best_per_label(index, query), atol=1e-6)


def test_label_probabilities_of_a_batch_are_one_distribution_per_query_led_by_its_best_label() -> None:
    # given
    rng = np.random.default_rng(3)
    index = LabelIndex(names=("a", "b", "c", "d"), vectors=unit_rows(rng, 8), owners=np.repeat(np.arange(4), 2))
    queries = unit_rows(rng, 6)

    # when
    probabilities = LabelProbabilities(index, temperature=0.05)(queries)

    # then
    assert probabilities.shape == (6, 4)
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (probabilities.argmax(axis=1) == index.label_scores(queries).argmax(axis=1)).all()


def test_a_trained_heads_batch_scores_are_each_querys_probabilities_then_its_novelty() -> None:
    # given: a trained head over 8-dimensional embeddings (3 classes, 6 training examples) and five queries
    rng = np.random.default_rng(13)
    head = TrainedHead(version=4, classes=("a", "b", "c"), weights=rng.standard_normal((3, 8)).astype(np.float32),
                       bias=rng.standard_normal(3).astype(np.float32), support=unit_rows(rng, 6), threshold=0.6,
                       novelty_floor=0.4)
    queries = unit_rows(rng, 5)

    # when: the batch is scored in one call, as the coalescer does
    scores = HeadScores(head)(queries)

    # then: each row is the query's class probabilities alone, then its novelty in the last column
    assert scores.shape == (5, 4)
    for row, query in enumerate(queries):
        assert np.allclose(scores[row, :-1], head.probabilities(query[None, :])[0], atol=1e-6)
        assert np.isclose(scores[row, -1], head.novelty(query[None, :])[0], atol=1e-6)
    assert HeadScores(head).names == ("a", "b", "c")

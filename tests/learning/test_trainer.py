"""The trainer against a real Redis: calibration, publication, and the guard against a worse head.

The inputs are synthetic vectors (three clusters) stored where the small tier would have put them,
so that these tests run without an inference server; tests/e2e/test_learning.py runs the real one.
"""

from __future__ import annotations

import os
import signal
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Label, LearningPolicy, Task
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier
from smallfirst.small_worker.heads import HeadCache, TrainedHead, load_head, publish_head
from smallfirst.small_worker.label_index import label_texts, text_digest
from smallfirst.small_worker.trainer import (
    SELF_LABELLED,
    Trainer,
    TrainingData,
    TrainingProcess,
    choose_threshold,
    choose_threshold_on_stream,
    clopper_pearson_lower,
    held_out_probabilities,
    self_labelled,
    train_head,
    worse_than_live,
)

MODEL = "synthetic-embed"
DIMS = 16
CLASSES = ("alpha", "beta", "gamma")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def synthetic_task(**policy: object) -> Task:
    labels = tuple(Label(name=name, examples=tuple(f"{name} seed {i}" for i in range(5))) for name in CLASSES)
    return Task.model_validate({
        "name": "synthetic", "kind": "classify", "labels": [label.model_dump() for label in labels],
        "learning": LearningPolicy(**{"enabled": True, "min_examples": 30, "retrain_every": 10, **policy}).model_dump(),
        "small": {"model": MODEL}, "frontier": {"model": "claude-haiku-5-5"}})


class Clusters:
    """Three well-separated clusters of unit vectors, one per class."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = np.random.default_rng(seed)
        self.centers = np.linalg.qr(self.rng.normal(size=(DIMS, DIMS)))[0][:len(CLASSES)]

    def sample(self, label: str) -> np.ndarray:
        v = self.centers[CLASSES.index(label)] + 0.25 * self.rng.normal(size=DIMS) / np.sqrt(DIMS)
        return (v / np.linalg.norm(v)).astype(np.float32)


def store_seed_vectors(client: redis.Redis, task: Task, clusters: Clusters) -> None:
    for label in task.labels:
        for text in label_texts(label):
            client.set(k.embedding_cache_key(MODEL, text_digest(text)), clusters.sample(label.name).tobytes())


def record(memory: ExampleMemory, task: Task, clusters: Clusters, job_id: str, true_label: str,
           answered: str | None = None) -> None:
    job = Job(id=job_id, tenant="t1", task=task.name, input={"text": f"message {job_id}"},
              route=RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.TASK_DEFAULT), created_at=0.0,
              updated_at=0.0, queued_at=0.0)
    memory.record(task, job, answered or true_label, ExampleSource.FRONTIER, model="claude-haiku-5-5",
                  vector=clusters.sample(true_label).tobytes())


def task_with_examples(client: redis.Redis, count: int) -> tuple[Task, Clusters]:
    """The synthetic task with its seeds' vectors stored and `count` frontier-labelled examples."""
    task, clusters = synthetic_task(), Clusters()
    store_seed_vectors(client, task, clusters)
    memory = ExampleMemory(client)
    for i in range(count):
        record(memory, task, clusters, f"job_{i}", CLASSES[i % 3])
    return task, clusters


@pytest.mark.parametrize(("correct", "wrong_below", "target", "expected"), [
    # 300 right answers above 0.6, 100 wrong ones below: every right one kept, plus the few wrong
    # ones the bound can afford
    (300, 100, 0.97, 0.6),
    # 50 right answers cannot prove 0.97 at 95% confidence (the bound is 0.942): nothing is kept
    (50, 0, 0.97, None),
])
def test_the_threshold_keeps_answers_whose_accuracy_bound_reaches_the_target(
        correct: int, wrong_below: int, target: float, expected: float | None) -> None:
    # given: held-out confidences of right answers in [0.6, 1) and of wrong ones in [0.1, 0.6)
    confidence = np.concatenate([np.linspace(0.6, 0.99, correct), np.linspace(0.1, 0.59, wrong_below)])
    hits = np.concatenate([np.ones(correct, dtype=bool), np.zeros(wrong_below, dtype=bool)])
    # when
    choice = choose_threshold(confidence, hits, target)
    # then
    if expected is None:
        assert choice.kept == 0
        assert choice.threshold > 1.0
    else:
        assert choice.threshold <= expected
        assert choice.kept_correct == correct
        assert choice.lower_bound >= target
        # the lowest such threshold: one more wrong answer kept would break the bound
        assert clopper_pearson_lower(correct, choice.kept + 1) < target
        assert choice.lower_bound == pytest.approx(clopper_pearson_lower(choice.kept_correct, choice.kept))


def test_the_threshold_on_the_stream_weights_the_calibration_curve_by_the_streams_confidences() -> None:
    # given: labelled examples right 99% of the time above 0.9 and 50% below, and a stream of
    # which 80% gets a confidence above 0.9 and 20% one of 0.55
    rng = np.random.default_rng(3)
    confidence = np.concatenate([np.full(1000, 0.95), np.full(1000, 0.55)])
    correct = np.concatenate([rng.random(1000) < 0.99, rng.random(1000) < 0.5])
    stream = np.concatenate([np.full(800, 0.95), np.full(200, 0.55)])
    # when
    choice = choose_threshold_on_stream(confidence, correct, stream, target=0.97)
    # then: only the confident part is kept (keeping all would average to about 0.89)
    assert choice.threshold == pytest.approx(0.95)
    assert 0.97 <= choice.lower_bound < 0.99
    # and a target above what even the confident part reaches keeps nothing
    assert choose_threshold_on_stream(confidence, correct, stream, target=0.999).kept == 0


def test_stream_inputs_whose_answer_is_known_count_as_they_are_not_as_the_curve_says() -> None:
    # given: a curve right 99% of the time at 0.95 and always at 0.99, and a stream of 500 inputs
    # at 0.99 and 500 at 0.95, 200 of which escalated and are known to be answered wrongly
    rng = np.random.default_rng(5)
    confidence = np.concatenate([np.full(1000, 0.95), np.full(1000, 0.99)])
    correct = np.concatenate([rng.random(1000) < 0.99, np.ones(1000, dtype=bool)])
    stream = np.concatenate([np.full(500, 0.99), np.full(500, 0.95)])
    known = np.concatenate([np.full(800, -1), np.zeros(200, dtype=np.int64)])
    # when: the known answers are given, and when they are not
    with_known = choose_threshold_on_stream(confidence, correct, stream, target=0.97, stream_correct=known)
    by_curve = choose_threshold_on_stream(confidence, correct, stream, target=0.97)
    # then: the curve alone would keep the inputs at 0.95 (about 0.995 expected), the known wrong
    # answers bring them to about 0.8, so only the confident half is kept
    assert by_curve.threshold == pytest.approx(0.95)
    assert with_known.threshold == pytest.approx(0.99)
    assert with_known.kept == 500


def test_the_bound_is_wider_with_fewer_calibration_examples() -> None:
    # given: the same 97.5% accurate curve measured on 200 and on 20,000 examples
    rng = np.random.default_rng(11)
    stream = np.full(1000, 0.9)

    def bound(examples: int) -> float:
        confidence = np.full(examples, 0.9)
        correct = rng.random(examples) < 0.975
        return choose_threshold_on_stream(confidence, correct, stream, target=0.5).lower_bound

    # when / then: the lower bound is further below 0.975 with few examples
    assert bound(200) < bound(20_000) - 0.005
    assert 0.96 < bound(20_000) < 0.976


def test_an_examples_held_out_vote_counts_its_nearest_neighbours_but_never_itself_or_its_copies() -> None:
    # given: 40 pairs of near twins (cosine 0.99) in directions of their own, the pairs' labels
    # alternating between two classes, so that only the vote can tell a pair's class; plus two exact
    # copies of a vector labelled with a third class, close to nothing else
    rng = np.random.default_rng(17)
    dims, pairs = 96, 40
    basis = np.linalg.qr(rng.normal(size=(dims, dims)))[0]
    directions, tilt = basis[:pairs + 1], basis[pairs + 1:2 * pairs + 1]
    twins = [np.stack([d, 0.99 * d + np.sqrt(1 - 0.99**2) * t]) for d, t in zip(directions[:pairs], tilt, strict=True)]
    x = np.concatenate([*twins, np.stack([directions[pairs]] * 2)]).astype(np.float32)
    y = np.concatenate([np.repeat(np.arange(pairs) % 2, 2), [2, 2]])
    # when: every held-out probability comes from the vote alone
    probabilities = held_out_probabilities(x, y, 3, folds=5, knn_weight=1.0)
    # then: each twin's vote is its twin's label, whichever fold the two fell in (a vote held out
    # by folds loses the twin when both are in the same fold)
    assert (probabilities[:2 * pairs].argmax(axis=1) == y[:2 * pairs]).all()
    assert (probabilities[np.arange(2 * pairs), y[:2 * pairs]] > 0.99).all()
    # and the copies do not vote for each other: their third class gets nothing from the vote
    assert (probabilities[2 * pairs:, 2] < 1e-6).all()


def test_a_trained_head_goes_live_and_a_polling_worker_cache_picks_it_up(redis_url: str) -> None:
    # given: a task with seeds and 40 frontier-labelled examples, and a worker's head cache that
    # has already looked (no head yet)
    client = redis.Redis.from_url(redis_url)
    task, clusters = task_with_examples(client, 40)
    cache = HeadCache(client, poll_interval_s=0.0)
    assert cache.get(task.name, MODEL) is None
    trainer = Trainer(client, embedder=None)
    # when
    assert trainer.due(task)
    report = trainer.train(task)
    # then: published, and the same cache object now serves it, with its metrics
    assert report.published, report.reason
    head = cache.get(task.name, MODEL)
    assert head is not None
    assert head.version == report.version
    assert head.classes == CLASSES
    probabilities = head.probabilities(np.stack([clusters.sample("beta")]))
    assert CLASSES[int(probabilities.argmax())] == "beta"
    assert head.meta["metrics"]["learned_examples"] == 40
    assert not trainer.due(task)


def test_a_task_without_a_minimum_gets_its_first_head_from_its_seeds_before_any_example(redis_url: str) -> None:
    # given: a task that learns with min_examples 0, its seeds' vectors stored, no example yet
    client = redis.Redis.from_url(redis_url)
    task, clusters = synthetic_task(min_examples=0), Clusters()
    store_seed_vectors(client, task, clusters)
    trainer = Trainer(client, embedder=None)
    # when
    assert trainer.due(task)
    report = trainer.train(task)
    # then: a head trained on the seeds alone is live, and the next one waits for retrain_every examples
    assert report.published, report.reason
    assert report.metrics["learned_examples"] == 0
    assert report.metrics["examples"] == sum(len(label_texts(label)) for label in task.labels)
    assert not trainer.due(task)
    memory = ExampleMemory(client)
    for i in range(task.learning.retrain_every - 1):
        record(memory, task, clusters, f"job_{i}", CLASSES[i % 3])
    assert not trainer.due(task)
    record(memory, task, clusters, "job_last", "alpha")
    assert trainer.due(task)


def sure_head(clusters: Clusters, *, novelty_floor: float) -> TrainedHead:
    """A live head that answers each cluster's class, surely near its centre."""
    return TrainedHead(version=1, classes=CLASSES, weights=(30 * clusters.centers).astype(np.float32),
                       bias=np.zeros(3, dtype=np.float32), support=clusters.centers.astype(np.float32),
                       threshold=0.5, novelty_floor=novelty_floor, meta={"trained_until": 100.0})


def test_recent_inputs_the_live_head_is_sure_of_become_examples_under_its_answer() -> None:
    # given: training data of 30 labelled examples and the recent inputs: 12 near a cluster's centre
    # (one of them twice), one that already is a training example, one half-way between two
    # clusters (unsure), and one unlike anything (beyond the novelty floor)
    clusters = Clusters()
    labelled = [CLASSES[i % 3] for i in range(30)]
    data = TrainingData(x=np.stack([clusters.sample(label) for label in labelled]),
                        y=np.array([CLASSES.index(label) for label in labelled]),
                        sources=np.full(30, ExampleSource.FRONTIER.value), created_at=np.arange(30) + 1.0,
                        classes=CLASSES)
    sure = [clusters.sample(CLASSES[i % 3]) for i in range(12)]
    between = clusters.centers[0] + clusters.centers[1]
    unlike = np.linalg.qr(clusters.rng.normal(size=(DIMS, DIMS)))[0][:, 0]
    unlike -= clusters.centers.T @ (clusters.centers @ unlike)
    recent = np.stack([*sure, sure[0], data.x[4], between / np.linalg.norm(between),
                       unlike / np.linalg.norm(unlike)]).astype(np.float32)
    live = sure_head(clusters, novelty_floor=0.5)
    # when
    taught = self_labelled(data, live, recent)
    # then: the 12 sure inputs, once each, under the live head's answers, never news for the guard
    added = taught.sources == SELF_LABELLED
    assert added.sum() == 12
    assert [CLASSES[i] for i in taught.y[added]] == [CLASSES[i % 3] for i in range(12)]
    assert (taught.created_at[added] == 0).all()
    assert np.array_equal(taught.x[:30], data.x)
    # and a head trained with them counts them apart from the labelled examples and never judges by them
    task = synthetic_task(min_examples=0)
    head, metrics = train_head(data, task, live, version=2, recent_inputs=recent, now=200.0)
    assert metrics["self_labelled_examples"] == 12
    # (they train its regression; only labelled examples vote and set the novelty)
    assert len(head.support) == 30
    assert metrics["learned_examples"] == 30
    assert metrics["examples"] == 30 + 12
    assert metrics["fresh_examples"] == 0  # none newer than the live head's trained_until
    # and without a live head nothing is self-labelled
    assert self_labelled(data, None, recent) is data


def test_training_runs_in_a_child_process_that_is_replaced_after_it_dies(redis_url: str) -> None:
    # given: a trainer whose fits run in a training process, and a task with enough examples
    client = redis.Redis.from_url(redis_url)
    task, _ = task_with_examples(client, 40)
    process = TrainingProcess()
    trainer = Trainer(client, embedder=None, fit=process)
    try:
        # when: it trains
        first = trainer.train(task)
        # then: the head was fitted in another process and published from this one
        assert first.published, first.reason
        children = list(process._pool._processes.values())
        assert len(children) == 1
        assert children[0].pid != os.getpid()
        # when: the child is killed, the next training fails with it, and the one after succeeds
        os.kill(children[0].pid, signal.SIGKILL)
        children[0].join(timeout=10)
        with pytest.raises(BrokenProcessPool):
            trainer.train(task)
        again = trainer.train(task)
        # then
        assert again.published, again.reason
        assert load_head(client, task.name, MODEL) is not None
    finally:
        process.close()


def test_a_head_worse_than_the_live_one_on_new_examples_never_goes_live(redis_url: str) -> None:
    # given: a live head that knows the clusters, trained on everything up to t=2000
    client = redis.Redis.from_url(redis_url)
    clock = Clock(1000.0)
    task, clusters = synthetic_task(), Clusters()
    store_seed_vectors(client, task, clusters)
    live = TrainedHead(version=1, classes=CLASSES, weights=(30 * clusters.centers).astype(np.float32),
                       bias=np.zeros(3, dtype=np.float32), support=clusters.centers.astype(np.float32),
                       threshold=0.5, novelty_floor=1.0, meta={"trained_until": 2000.0})
    publish_head(client, task.name, MODEL, live)
    # and training data dominated by wrong answers from before then (every label rotated), with
    # a few right answers on new messages that came after it
    memory = ExampleMemory(client, clock=clock)
    for i in range(300):
        clock.now += 1
        record(memory, task, clusters, f"bad_{i}", CLASSES[i % 3], answered=CLASSES[(i + 1) % 3])
    clock.now = 2001.0
    for i in range(30):
        clock.now += 1
        record(memory, task, clusters, f"new_{i}", CLASSES[i % 3])
    # when
    report = Trainer(client, embedder=None, clock=clock).train(task)
    # then: the new head was trained and measured on the new messages, and the live head stays
    assert not report.published
    assert report.metrics["fresh_examples"] == 30
    assert report.metrics["fresh_accuracy"] < report.metrics["live_fresh_accuracy"] == 1.0
    still = load_head(client, task.name, MODEL)
    assert still is not None
    assert still.version == 1
    assert int(client.get(k.head_version_key(task.name, MODEL)) or 0) == 1


def test_only_one_trainer_trains_a_task_at_a_time(redis_url: str) -> None:
    # given: another trainer holds the task's lock
    client = redis.Redis.from_url(redis_url)
    task = synthetic_task()
    client.set(k.train_lock_key(task.name, MODEL), "someone-else", ex=60)
    # when
    report = Trainer(client, embedder=None).train(task)
    # then
    assert not report.published
    assert "lock" in report.reason


def test_the_guard_calls_a_head_worse_only_when_the_paired_difference_is_beyond_chance() -> None:
    # given: fresh examples on which the live head alone is right on 2 and the new head alone on 1
    # (noise), and ones on which the live head alone is right on 20 and the new head alone on 2
    # when / then: the first is no evidence against the new head, the second is
    assert not worse_than_live({"fresh_only_live_right": 2, "fresh_only_new_right": 1})
    assert worse_than_live({"fresh_only_live_right": 20, "fresh_only_new_right": 2})
    # and a new head that is right more often is never worse
    assert not worse_than_live({"fresh_only_live_right": 3, "fresh_only_new_right": 30})


def test_a_published_head_votes_with_its_nearest_examples_after_a_round_trip_through_redis(redis_url: str) -> None:
    # given: a head whose regression knows nothing (zero weights) but whose support rows are labelled
    client = redis.Redis.from_url(redis_url)
    clusters = Clusters()
    head = TrainedHead(version=3, classes=CLASSES, weights=np.zeros((3, clusters.centers.shape[1]), dtype=np.float32),
                       bias=np.zeros(3, dtype=np.float32), support=clusters.centers.astype(np.float32),
                       threshold=0.5, novelty_floor=1.0, support_labels=np.arange(3), knn_weight=0.5)
    publish_head(client, "votes", MODEL, head)
    # when: it is loaded back and scores a message of the second cluster
    loaded = load_head(client, "votes", MODEL)
    assert loaded is not None
    probabilities, novelty = loaded.scores(np.stack([clusters.sample("beta")]))
    # then: the vote (half the weight) makes "beta" the answer the flat regression could not give
    assert loaded.knn_weight == 0.5
    assert CLASSES[int(probabilities[0].argmax())] == "beta"
    assert probabilities[0].max() > 0.5
    assert probabilities[0].sum() == pytest.approx(1.0, abs=1e-5)
    # and the novelty comes from the same similarities: close to its cluster's centre
    assert 0.0 <= novelty[0] < 0.5

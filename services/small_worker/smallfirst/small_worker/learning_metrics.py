"""Prometheus metrics of the trainer: trainings (published or not), their seconds, the live head."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from smallfirst.small_worker.trainer import TrainingReport

TRAININGS = Counter("smallfirst_head_trainings_total", "Trainings of a task's head, by result",
                    ["task", "published"])
TRAINING_SECONDS = Histogram("smallfirst_head_training_seconds", "Seconds one training of a task's head took",
                             ["task"], buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
HEAD_VERSION = Gauge("smallfirst_head_version", "Version of the task's live head", ["task"])
HEAD_EXAMPLES = Gauge("smallfirst_head_examples", "Training examples of the task's latest trained head",
                      ["task", "kind"])
HEAD_THRESHOLD = Gauge("smallfirst_head_threshold", "Calibrated confidence threshold of the task's live head",
                       ["task"])


def record_training(report: TrainingReport) -> None:
    TRAININGS.labels(report.task, str(report.published).lower()).inc()
    seconds = report.metrics.get("training_s")
    if isinstance(seconds, int | float):
        TRAINING_SECONDS.labels(report.task).observe(seconds)
    if report.metrics:
        HEAD_EXAMPLES.labels(report.task, "all").set(report.metrics.get("examples", 0))
        HEAD_EXAMPLES.labels(report.task, "learned").set(report.metrics.get("learned_examples", 0))
    if report.published and report.version is not None:
        HEAD_VERSION.labels(report.task).set(report.version)
        threshold = report.metrics.get("threshold")
        if isinstance(threshold, int | float):
            HEAD_THRESHOLD.labels(report.task).set(threshold)

"""Prometheus metrics of the API process, served at /metrics.

`ApiMetrics` owns one registry per app (no import-time globals) holding the API's share of the job
metrics (`JobMetrics`: submissions and cancels; the worker pools count every other transition),
the queue depths read from Redis at scrape time (`QueueCollector`), and the process' own CPU, memory
and garbage-collector figures. Names and labels: deploy/METRICS.md.

A scrape reads Redis, so `render` blocks: the route runs it on a worker thread, off the event loop.
With several uvicorn workers each process has its own registry; a scrape reaches one of them
(prometheus_client's multiprocess mode is the way to aggregate, once it is wanted). The queue
gauges are the same from every process; the job counters are each process' own share.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector

from smallfirst.common.jobs import Job
from smallfirst.common.metrics import JobMetrics, QueueCollector, render_metrics


class ApiMetrics:
    def __init__(self, redis_url: str | None = None, registry: CollectorRegistry | None = None) -> None:
        """`redis_url`: the broker whose queue depths this API reports; None reports none."""
        self.registry = CollectorRegistry() if registry is None else registry
        self.jobs = JobMetrics(self.registry)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.queues: QueueCollector | None = None
        if redis_url is not None:
            self.queues = QueueCollector(redis_url)
            self.registry.register(self.queues)

    def jobs_submitted(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.jobs.record_job_submitted(job)

    def job_changed(self, before: Job, after: Job) -> None:
        """A transition the API made (a cancel), with the record before and after it."""
        self.jobs.record_job_transition(before, after)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition in the format the scraper accepts, and its content type. Blocks (reads Redis)."""
        return render_metrics(accept, self.registry)

    def close(self) -> None:
        if self.queues is not None:
            self.queues.close()

"""Prometheus metrics of the API process, served at /metrics.

The hook for observability: `ApiMetrics` owns one registry per app (no import-time globals), so
more collectors are added here and recorded by `JobService`; `render()` is all the route needs.
With several uvicorn workers each process has its own registry; a scrape reaches one of them
(prometheus_client's multiprocess mode is the way to aggregate, once it is wanted).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from smallfirst.common.jobs import Job


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.submitted = Counter(
            "smallfirst_jobs_submitted", "Jobs accepted by the API, by task and by the tier they were routed to.",
            ["task", "tier"], registry=self.registry)

    def jobs_submitted(self, jobs: Iterable[Job]) -> None:
        for job in jobs:
            self.submitted.labels(task=job.task, tier=job.route.tier.value).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

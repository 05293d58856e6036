"""Every Prometheus metric of smallfirst, in one place (names, labels and label values are listed in
deploy/METRICS.md; the dashboard and alert rules depend on them, so rename nothing without them).

Metrics come in sets, each created on a registry: `JobMetrics` (API and worker pools),
`FrontierMetrics` (frontier pool), and `QueueCollector`, which reads queue depths from Redis when
scraped instead of counting them. The inference service's own set is `smallfirst.inference.metrics`.
The worker pools use `default_job_metrics()` / `default_frontier_metrics()` on the default
registry and serve it with `start_metrics_server(port)`; the API serves its registry on its own
`/metrics` route (`render_metrics`).

Job counters move in `JobMetrics.record_job_transition`, called by whoever changed a job with the
record before and after the change; it counts the events of `smallfirst.common.events`, the same
stream the job store turns into the tenant's `/v1/stats`. The store's compare-and-set lets each
transition happen exactly once, so each job is counted once however often its messages are delivered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

import redis
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smallfirst.common import constants as k
from smallfirst.common.events import (
    AttemptEnded,
    AttemptStarted,
    DeadLettered,
    Ended,
    Escalated,
    JobEvent,
    Replayed,
    Submitted,
    transition_events,
)
from smallfirst.common.jobs import Job, Usage

log = logging.getLogger(__name__)

# Job phases observed by smallfirst_job_duration_seconds.
PHASE_QUEUE_WAIT = "queue_wait"  # enqueued (or escalated) -> a worker started the attempt
PHASE_RUN = "run"  # an attempt's start -> its end
PHASE_SUBMIT_TO_RESULT = "submit_to_result"  # job created -> terminal state
# Token directions of smallfirst_frontier_tokens_total.
DIRECTION_INPUT = "input"
DIRECTION_OUTPUT = "output"
DIRECTION_CACHE_READ = "cache_read"
DIRECTION_CACHE_CREATION = "cache_creation"
# Outcomes of smallfirst_frontier_requests_total.
OUTCOME_OK = "ok"
OUTCOME_RATE_LIMITED = "rate_limited"
OUTCOME_OVERLOADED = "overloaded"
OUTCOME_SERVER_ERROR = "server_error"
OUTCOME_CLIENT_ERROR = "client_error"
OUTCOME_TIMEOUT = "timeout"
OUTCOME_CONNECTION_ERROR = "connection_error"

# Seconds, from a cache hit to a long backlog; the same buckets for every phase so that they compare.
JOB_DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                          300.0, 600.0, 1800.0, 3600.0)
RATELIMIT_WAIT_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def frontier_outcome(status_code: int | None, *, timed_out: bool = False) -> str:
    """The outcome label of one frontier HTTP call from its status (None: no response at all)."""
    if status_code is None:
        return OUTCOME_TIMEOUT if timed_out else OUTCOME_CONNECTION_ERROR
    if status_code < 400:
        return OUTCOME_OK
    if status_code == 429:
        return OUTCOME_RATE_LIMITED
    if status_code == 529:
        return OUTCOME_OVERLOADED
    if status_code >= 500:
        return OUTCOME_SERVER_ERROR
    return OUTCOME_CLIENT_ERROR


class JobMetrics:
    """Job counters and latencies: the API records submissions (and cancels), the worker pools
    every other transition."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.jobs_submitted = Counter(
            "smallfirst_jobs_submitted_total", "Jobs accepted by the API, by task and the tier they were routed to.",
            ["task", "tier"], registry=reg)
        self.jobs_ended = Counter(
            "smallfirst_jobs_ended_total",
            "Jobs that reached a terminal status, by task, the tier that ended them and status.",
            ["task", "tier", "status"], registry=reg)
        self.escalations = Counter(
            "smallfirst_escalations_total",
            "Jobs handed from the small tier to the frontier tier, by task and reason code (a job with "
            "several reasons counts once per distinct code).", ["task", "reason"], registry=reg)
        self.job_duration = Histogram(
            "smallfirst_job_duration_seconds",
            "Job latency by tier and phase: queue_wait (queued to attempt start), run (one attempt), "
            "submit_to_result (created to terminal).", ["tier", "phase"], buckets=JOB_DURATION_BUCKETS_S,
            registry=reg)
        self.job_cost = Counter(
            "smallfirst_job_cost_usd_total", "Billed cost of ended attempts in US dollars, by task and tier.",
            ["task", "tier"], registry=reg)
        self.savings = Counter(
            "smallfirst_savings_usd_total",
            "Estimated frontier cost avoided by jobs the small tier answered, in US dollars, by task.",
            ["task"], registry=reg)
        self.dead_letters_added = Counter(
            "smallfirst_dead_letters_added_total",
            "Jobs put into their tenant's dead letters (a failure a person can act on), by task and reason; "
            "undecodable queue messages count with task \"\" and reason undecodable_message.",
            ["task", "reason"], registry=reg)
        self.dead_letters_replayed = Counter(
            "smallfirst_dead_letters_replayed_total", "Dead-lettered jobs replayed, by task and reason.",
            ["task", "reason"], registry=reg)
        self.batch_cost = Counter(
            "smallfirst_batch_cost_usd_total",
            "Billed cost of frontier attempts sent in Message Batches (at the batch price), in US dollars, by task.",
            ["task"], registry=reg)
        self.batch_savings = Counter(
            "smallfirst_batch_savings_usd_total",
            "What batched frontier attempts would have cost in real time less what they cost, in US dollars, by task.",
            ["task"], registry=reg)

    def record_job_submitted(self, job: Job) -> None:
        """The API stored (and queued) a new job."""
        self.record(job.task, transition_events(None, job))

    def record_job_transition(self, before: Job | None, after: Job) -> None:
        """Count one stored transition, from the same events the job store's stats are made of.

        Call it after every transition that the store accepted, with the record before and after;
        a pair in which nothing changed counts nothing, so a repeated call adds nothing.
        """
        self.record(after.task, transition_events(before, after))

    def record(self, task: str, events: list[JobEvent]) -> None:
        for event in events:
            if isinstance(event, Submitted):
                self.jobs_submitted.labels(task, event.tier.value).inc()
            elif isinstance(event, AttemptStarted):
                if event.queue_wait_s is not None:
                    self.job_duration.labels(event.tier.value, PHASE_QUEUE_WAIT).observe(event.queue_wait_s)
            elif isinstance(event, AttemptEnded):
                if event.run_s is not None:
                    self.job_duration.labels(event.tier.value, PHASE_RUN).observe(event.run_s)
                if event.billed and event.cost_usd > 0:
                    self.job_cost.labels(task, event.tier.value).inc(event.cost_usd)
                    if event.batched:
                        self.batch_cost.labels(task).inc(event.cost_usd)
                if event.batch_savings_usd > 0:
                    self.batch_savings.labels(task).inc(event.batch_savings_usd)
            elif isinstance(event, Escalated):
                for code in event.reason_codes:
                    self.escalations.labels(task, code).inc()
            elif isinstance(event, Ended):
                self.jobs_ended.labels(task, event.tier.value, event.status.value).inc()
                if event.submit_to_result_s is not None:
                    self.job_duration.labels(event.tier.value, PHASE_SUBMIT_TO_RESULT).observe(
                        event.submit_to_result_s)
                if event.savings_usd > 0:
                    self.savings.labels(task).inc(event.savings_usd)
            elif isinstance(event, DeadLettered):
                self.dead_letters_added.labels(task, event.reason).inc()
            elif isinstance(event, Replayed):
                self.dead_letters_replayed.labels(task, event.reason).inc()


class FrontierMetrics:
    """What the frontier pool spends and waits for, per provider call."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg
        self.tokens = Counter(
            "smallfirst_frontier_tokens_total",
            "Tokens the frontier provider reported, by model and direction (input, output, cache_read, "
            "cache_creation).", ["model", "direction"], registry=reg)
        self.cost = Counter(
            "smallfirst_frontier_cost_usd_total", "Cost of frontier responses in US dollars, by model.",
            ["model"], registry=reg)
        self.requests = Counter(
            "smallfirst_frontier_requests_total",
            "HTTP calls to the frontier provider, by model and outcome (ok, rate_limited, overloaded, "
            "server_error, client_error, timeout, connection_error); retries count separately.",
            ["model", "outcome"], registry=reg)
        self.ratelimit_wait = Histogram(
            "smallfirst_frontier_ratelimit_wait_seconds",
            "Time a frontier call waited for the shared rate limiter before it was sent, by model.",
            ["model"], buckets=RATELIMIT_WAIT_BUCKETS_S, registry=reg)

    def record_request(self, model: str, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()

    def record_usage(self, model: str, usage: Usage, cost_usd: float) -> None:
        """One frontier response's tokens and cost (every response, also one later rejected)."""
        for direction, tokens in ((DIRECTION_INPUT, usage.input_tokens), (DIRECTION_OUTPUT, usage.output_tokens),
                                  (DIRECTION_CACHE_READ, usage.cache_read_input_tokens),
                                  (DIRECTION_CACHE_CREATION, usage.cache_creation_input_tokens)):
            if tokens:
                self.tokens.labels(model, direction).inc(tokens)
        if cost_usd > 0:
            self.cost.labels(model).inc(cost_usd)

    def observe_ratelimit_wait(self, model: str, wait_s: float) -> None:
        self.ratelimit_wait.labels(model).observe(max(0.0, wait_s))


# One set of each per process on the default registry, for the worker pools (whose single process
# serves REGISTRY with start_metrics_server); created on first use, not at import.
_defaults: dict[str, Any] = {}
_defaults_lock = threading.Lock()


def _default(name: str, factory: Callable[[], Any]) -> Any:
    with _defaults_lock:
        if name not in _defaults:
            _defaults[name] = factory()
        return _defaults[name]


def default_job_metrics() -> JobMetrics:
    metrics: JobMetrics = _default("jobs", JobMetrics)
    return metrics


def default_frontier_metrics() -> FrontierMetrics:
    metrics: FrontierMetrics = _default("frontier", FrontierMetrics)
    return metrics


# ---- Queue depth, read from Redis at scrape time --------------------------------------------------
class QueueCollector(Collector):
    """`smallfirst_queue_length{queue}` (each queue's priority lists summed), `smallfirst_unacked_messages`
    (kombu's unacked hash: delivered, not yet acknowledged), the age of the oldest unacked delivery,
    and `smallfirst_queue_redis_up`. A scrape never fails because Redis does: reads time out after
    `timeout_s` and only `smallfirst_queue_redis_up 0` is reported then."""

    def __init__(self, redis_url: str, *, queues: Iterable[str] = k.ALL_QUEUES, timeout_s: float = 0.5,
                 clock: Callable[[], float] = time.time) -> None:
        self.queues = tuple(queues)
        self.clock = clock
        # Its own small pool with short timeouts: a slow Redis must not hold a scrape for long.
        self.client = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                           retry_on_timeout=False, max_connections=4)

    def describe(self) -> Iterable[Metric]:
        # Without describe() prometheus_client would collect() (read Redis) when registering.
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("smallfirst_queue_length", "Messages waiting in a Celery queue (all priority "
                              "lists summed), plus the jobs waiting for it in its tenants' fair lists.",
                              labels=["queue"]),
            GaugeMetricFamily("smallfirst_unacked_messages", "Messages delivered to a worker and not yet "
                              "acknowledged (kombu's unacked hash)."),
            GaugeMetricFamily("smallfirst_unacked_oldest_age_seconds", "Age of the oldest unacknowledged "
                              "delivery (0 when there is none)."),
            GaugeMetricFamily("smallfirst_queue_redis_up", "1 when the last scrape could read the broker."),
        ]

    def collect(self) -> Iterable[Metric]:
        length, unacked, oldest_age, up = self._families()
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for queue in self.queues:
                    for key in k.queue_backlog_keys(queue):
                        pipe.llen(key)
                pipe.hlen(k.KOMBU_UNACKED_KEY)
                pipe.zrange(k.KOMBU_UNACKED_INDEX_KEY, 0, 0, withscores=True)
                results = pipe.execute()
        except (redis.RedisError, OSError) as exc:
            log.warning("metrics: cannot read queue lengths from Redis: %s", exc)
            up.add_metric([], 0)
            return [up]
        start = 0
        for queue in self.queues:
            end = start + len(k.queue_backlog_keys(queue))
            length.add_metric([queue], sum(int(n) for n in results[start:end]))
            start = end
        unacked.add_metric([], int(results[-2]))
        oldest = results[-1]
        oldest_age.add_metric([], max(0.0, self.clock() - float(oldest[0][1])) if oldest else 0.0)
        up.add_metric([], 1)
        return [length, unacked, oldest_age, up]

    def close(self) -> None:
        self.client.close()


# ---- Exposition ----------------------------------------------------------------------------------
def start_metrics_server(port: int, addr: str = "0.0.0.0",  # scraped from other pods
                         registry: CollectorRegistry | None = None) -> WSGIServer | None:
    """Serve /metrics on `port` from a daemon thread (worker pools, inference service); 0 disables
    it. Returns the server (call `shutdown()` to stop it) or None."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY if registry is None else registry)
    log.info("metrics: serving on %s:%d", addr, port)
    return server


def render_metrics(accept: str | None = None, registry: CollectorRegistry | None = None) -> tuple[bytes, str]:
    """The exposition body and its content type, in the format the scraper's Accept header asks for;
    for a web framework's own /metrics route (run it off the event loop: it may read Redis)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(REGISTRY if registry is None else registry), content_type

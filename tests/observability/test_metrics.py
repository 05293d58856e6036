"""The Prometheus metrics: job counters moved by real job transitions, queue depth read from a real
Redis broker, and the exposition of every metric checked by promtool."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.jobs import Job, JobStatus, Priority, RouteDecision, RouteReason, Tier, Usage, Verdict
from smallfirst.common.metrics import (
    PHASE_QUEUE_WAIT,
    PHASE_RUN,
    PHASE_SUBMIT_TO_RESULT,
    FrontierMetrics,
    JobMetrics,
    QueueCollector,
    render_metrics,
    start_metrics_server,
)
from smallfirst.common.queues import Publisher, message_priority
from smallfirst.inference.metrics import InferenceMetrics
from tests.support.procs import free_port, require_binary

TASK = "ticket_intent"


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> JobMetrics:
    return JobMetrics(registry)


@pytest.fixture
def frontier_metrics(registry: CollectorRegistry) -> FrontierMetrics:
    return FrontierMetrics(registry)


@pytest.fixture
def queue_collector(redis_url: str, registry: CollectorRegistry) -> Iterator[QueueCollector]:
    collector = QueueCollector(redis_url)
    registry.register(collector)
    yield collector
    collector.close()


def new_job(*, tier: Tier = Tier.SMALL, created_at: float = 1000.0, priority: Priority = Priority.NORMAL) -> Job:
    return Job(id=f"job_{tier.value}_{created_at}", tenant="acme", task=TASK, input={"text": "my card is lost"},
               priority=priority, route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT),
               created_at=created_at, updated_at=created_at, queued_at=created_at)


def promtool_check(exposition: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), "check", "metrics"], input=exposition.decode(),
                          capture_output=True, text=True, timeout=30, check=False)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ---- job transitions -------------------------------------------------------------------------------
def test_escalated_job_counts_one_escalation_one_end_and_each_phase(
        metrics: JobMetrics, registry: CollectorRegistry) -> None:
    # given a job that the small tier answers wrongly and the frontier tier answers right
    job = new_job(created_at=1000.0)
    steps: list[tuple[Job, Job]] = []

    def apply(change: Callable[[Job], Job]) -> None:
        nonlocal job
        before = job.model_copy(deep=True)
        job = change(job.model_copy(deep=True))
        steps.append((before, job))

    apply(lambda j: lifecycle.begin_attempt(j, tier=Tier.SMALL, model="minilm", worker="w1", task_id="t1",
                                            now=1002.0, lease_s=60))
    apply(lambda j: lifecycle.escalate(j, lifecycle.AttemptEnd(
        attempt_number=1, task_id="t1", now=1002.5, usage=Usage(input_tokens=10),
        verdict=Verdict(passed=False), billed=True), reasons=["choice: 'x' is not one of the 77 allowed choices",
                                                "min_confidence: confidence 0.2 is below 0.6"]))
    apply(lambda j: lifecycle.begin_attempt(j, tier=Tier.FRONTIER, model="claude", worker="w2", task_id="t2",
                                            now=1004.5, lease_s=60))
    apply(lambda j: lifecycle.succeed(j, lifecycle.AttemptEnd(
        attempt_number=2, task_id="t2", now=1006.5, answer="lost_card", confidence=None,
        usage=Usage(input_tokens=100, output_tokens=5), cost_usd=0.002, verdict=Verdict(passed=True),
        billed=True)))

    # when each stored transition is recorded, and the last one once more (a duplicate call)
    for before, after in steps:
        metrics.record_job_transition(before, after)
    metrics.record_job_transition(steps[-1][1], steps[-1][1])

    # then the escalation and the end count once, and each phase is observed once with its duration
    assert sample(registry, "smallfirst_escalations_total", task=TASK, reason="choice") == 1
    assert sample(registry, "smallfirst_escalations_total", task=TASK, reason="min_confidence") == 1
    assert sample(registry, "smallfirst_jobs_ended_total", task=TASK, tier="frontier", status="succeeded") == 1
    assert sample(registry, "smallfirst_jobs_ended_total", task=TASK, tier="small", status="succeeded") == 0
    assert sample(registry, "smallfirst_job_duration_seconds_count", tier="small", phase=PHASE_QUEUE_WAIT) == 1
    assert sample(registry, "smallfirst_job_duration_seconds_sum", tier="small", phase=PHASE_QUEUE_WAIT) == 2.0
    assert sample(registry, "smallfirst_job_duration_seconds_sum", tier="frontier", phase=PHASE_QUEUE_WAIT) == 2.0
    assert sample(registry, "smallfirst_job_duration_seconds_sum", tier="small", phase=PHASE_RUN) == 0.5
    assert sample(registry, "smallfirst_job_duration_seconds_sum", tier="frontier", phase=PHASE_RUN) == 2.0
    assert sample(registry, "smallfirst_job_duration_seconds_count", tier="frontier",
                  phase=PHASE_SUBMIT_TO_RESULT) == 1
    assert sample(registry, "smallfirst_job_duration_seconds_sum", tier="frontier",
                  phase=PHASE_SUBMIT_TO_RESULT) == 6.5
    assert sample(registry, "smallfirst_job_cost_usd_total", task=TASK, tier="frontier") == 0.002
    assert sample(registry, "smallfirst_savings_usd_total", task=TASK) == 0


def test_small_tier_success_counts_its_savings(metrics: JobMetrics, registry: CollectorRegistry) -> None:
    # given a job the small tier answered, with the frontier cost it would have had
    queued = new_job()
    running = lifecycle.begin_attempt(queued.model_copy(deep=True), tier=Tier.SMALL, model="minilm", worker="w",
                                      task_id="t", now=1001.0, lease_s=60)
    done = lifecycle.succeed(running.model_copy(deep=True), lifecycle.AttemptEnd(
        attempt_number=1, task_id="t", now=1001.25, answer="lost_card", confidence=0.9,
        usage=Usage(input_tokens=20), cost_usd=0.0, verdict=Verdict(passed=True),
        estimated_frontier_cost_usd=0.0015, billed=True))

    # when its transitions are recorded
    metrics.record_job_transition(queued, running)
    metrics.record_job_transition(running, done)

    # then it ended on the small tier and saved the estimate
    assert sample(registry, "smallfirst_jobs_ended_total", task=TASK, tier="small", status="succeeded") == 1
    assert sample(registry, "smallfirst_savings_usd_total", task=TASK) == 0.0015
    assert sample(registry, "smallfirst_escalations_total", task=TASK, reason="choice") == 0


def test_cancel_of_an_escalated_job_counts_it_ended_on_the_frontier_tier(
        metrics: JobMetrics, registry: CollectorRegistry) -> None:
    # given a job waiting in the escalation queue
    job = lifecycle.begin_attempt(new_job(), tier=Tier.SMALL, model="m", worker="w", task_id="t", now=1001.0,
                                  lease_s=60)
    escalated = lifecycle.escalate(job, lifecycle.AttemptEnd(
        attempt_number=1, task_id="t", now=1001.5), reasons=["small_tier_error: unavailable: connection refused"])

    # when the tenant cancels it
    cancelled = lifecycle.cancel(escalated.model_copy(deep=True), now=1003.0)
    metrics.record_job_transition(escalated, cancelled)

    # then it is counted as cancelled on the tier it was waiting for
    assert cancelled.status is JobStatus.CANCELLED
    assert sample(registry, "smallfirst_jobs_ended_total", task=TASK, tier="frontier", status="cancelled") == 1


def test_submitted_jobs_are_counted_by_routed_tier(metrics: JobMetrics, registry: CollectorRegistry) -> None:
    # given two jobs routed to different tiers
    # when the API records them
    metrics.record_job_submitted(new_job(tier=Tier.SMALL))
    metrics.record_job_submitted(new_job(tier=Tier.FRONTIER))
    metrics.record_job_submitted(new_job(tier=Tier.FRONTIER, created_at=2000.0))

    # then each tier has its count
    assert sample(registry, "smallfirst_jobs_submitted_total", task=TASK, tier="small") == 1
    assert sample(registry, "smallfirst_jobs_submitted_total", task=TASK, tier="frontier") == 2


def test_frontier_usage_counts_tokens_by_direction_and_cost(
        frontier_metrics: FrontierMetrics, registry: CollectorRegistry) -> None:
    # given a frontier response with cache reads
    usage = Usage(input_tokens=100, output_tokens=20, cache_read_input_tokens=50)

    # when it is recorded with its cost, a rate-limited request and a limiter wait
    frontier_metrics.record_usage("claude", usage, 0.0031)
    frontier_metrics.record_request("claude", "rate_limited")
    frontier_metrics.observe_ratelimit_wait("claude", 0.25)

    # then each direction, the cost, the outcome and the wait are counted
    assert sample(registry, "smallfirst_frontier_tokens_total", model="claude", direction="input") == 100
    assert sample(registry, "smallfirst_frontier_tokens_total", model="claude", direction="output") == 20
    assert sample(registry, "smallfirst_frontier_tokens_total", model="claude", direction="cache_read") == 50
    assert sample(registry, "smallfirst_frontier_cost_usd_total", model="claude") == 0.0031
    assert sample(registry, "smallfirst_frontier_requests_total", model="claude", outcome="rate_limited") == 1
    assert sample(registry, "smallfirst_frontier_ratelimit_wait_seconds_sum", model="claude") == 0.25


# ---- queue depth -----------------------------------------------------------------------------------
def test_queue_length_sums_every_priority_list_and_unacked_counts_fetched_messages(
        celery_app: Celery, redis_url: str, registry: CollectorRegistry, queue_collector: QueueCollector) -> None:
    # given small jobs published at every priority, and an escalation
    publisher = Publisher(celery_app)
    jobs = [new_job(created_at=1000.0 + i, priority=p) for i, p in enumerate(Priority)]
    publisher.publish_jobs(jobs)
    publisher.publish_escalation(jobs[0])
    client = redis.Redis.from_url(redis_url)
    used_lists = {key for key in k.priority_list_keys(k.QUEUE_SMALL) if client.llen(key)}

    # when a consumer fetches one small message without acknowledging it yet
    with celery_app.connection_for_read() as connection:
        fetched = connection.SimpleQueue(k.QUEUE_SMALL, no_ack=False).get(timeout=5)
        assert fetched is not None

        # then the small queue counts what is left over all its priority lists, and unacked the fetched one
        assert len(used_lists) == 3
        assert sample(registry, "smallfirst_queue_length", queue=k.QUEUE_SMALL) == 2
        assert sample(registry, "smallfirst_queue_length", queue=k.QUEUE_ESCALATION) == 1
        assert sample(registry, "smallfirst_queue_length", queue=k.QUEUE_FRONTIER) == 0
        assert sample(registry, "smallfirst_unacked_messages") == 1
        assert sample(registry, "smallfirst_unacked_oldest_age_seconds") >= 0
        assert sample(registry, "smallfirst_queue_redis_up") == 1

        # and once it is acknowledged the unacked count goes back down
        fetched.ack()
        assert sample(registry, "smallfirst_unacked_messages") == 0


def test_escalation_priority_is_one_step_ahead_in_the_escalation_lists(
        celery_app: Celery, redis_url: str, registry: CollectorRegistry, queue_collector: QueueCollector) -> None:
    # given a normal-priority job escalated (published one priority step higher)
    job = new_job(priority=Priority.NORMAL)

    # when it is published to the escalation queue
    Publisher(celery_app).publish_escalation(job)

    # then it sits in a non-default priority list, which the queue length still counts
    step = message_priority(Priority.NORMAL, escalated=True)
    client = redis.Redis.from_url(redis_url)
    keys = [key for key in k.priority_list_keys(k.QUEUE_ESCALATION) if client.llen(key)]
    assert keys == [k.priority_list_keys(k.QUEUE_ESCALATION)[k.PRIORITY_STEPS.index(step)]]
    assert sample(registry, "smallfirst_queue_length", queue=k.QUEUE_ESCALATION) == 1


def test_scrape_survives_an_unreachable_redis(registry: CollectorRegistry) -> None:
    # given a queue collector whose Redis is not listening
    collector = QueueCollector(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    registry.register(collector)
    FrontierMetrics(registry).record_request("claude", "ok")

    # when the registry is scraped
    body = generate_latest(registry).decode()

    # then the scrape succeeds, says Redis is down, and reports no made-up queue lengths
    assert "smallfirst_queue_redis_up 0.0" in body
    assert "smallfirst_queue_length{" not in body
    assert 'smallfirst_frontier_requests_total{model="claude",outcome="ok"} 1.0' in body
    collector.close()


# ---- exposition --------------------------------------------------------------------------------------
def _populate(registry: CollectorRegistry) -> None:
    """Every metric set on `registry`, each metric with at least one sample."""
    jobs, frontier, inference = JobMetrics(registry), FrontierMetrics(registry), InferenceMetrics("m", registry)
    job = lifecycle.begin_attempt(new_job(), tier=Tier.SMALL, model="m", worker="w", task_id="t", now=1001.0,
                                  lease_s=60)
    jobs.record_job_submitted(new_job())
    jobs.record_job_transition(new_job(), job)
    escalated = lifecycle.escalate(job.model_copy(deep=True), lifecycle.AttemptEnd(
        attempt_number=1, task_id="t", now=1001.5), reasons=["choice: nope"])
    jobs.record_job_transition(job, escalated)
    frontier.record_usage("claude", Usage(input_tokens=1, output_tokens=1), 0.001)
    frontier.record_request("claude", "ok")
    frontier.observe_ratelimit_wait("claude", 0.01)
    inference.prompt_tokens.labels("m").inc(10)
    inference.generated_tokens.labels("m").inc(3)
    inference.requests_in_flight.labels("m", "Generate").set(0)
    inference.requests.labels("m", "Generate", "OK").inc()
    inference.aborted_requests.labels("m").inc()
    inference.engine_unfinished_requests.labels("m").set(2)
    inference.draining.labels("m").set(0)


def test_every_metric_passes_promtool_check(
        celery_app: Celery, registry: CollectorRegistry, queue_collector: QueueCollector) -> None:
    # given every metric with samples, queue depths from a real broker included
    _populate(registry)
    Publisher(celery_app).publish_jobs([new_job()])

    # when the registry is exposed in the text format
    result = promtool_check(generate_latest(registry))

    # then promtool finds nothing to complain about
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_metrics_server_serves_the_registry_and_port_zero_disables_it(registry: CollectorRegistry) -> None:
    # given populated metrics
    _populate(registry)

    # when a metrics server is started on a free port (and one on port 0)
    port = free_port()
    server = start_metrics_server(port, addr="127.0.0.1", registry=registry)
    disabled = start_metrics_server(0, registry=registry)
    assert server is not None
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    finally:
        server.shutdown()

    # then it serves the registry in a form promtool accepts, and port 0 started nothing
    assert disabled is None
    assert response.status_code == 200
    assert "smallfirst_escalations_total" in response.text
    result = promtool_check(response.content)
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_metrics_follows_the_scrapers_accept_header(registry: CollectorRegistry) -> None:
    # given populated metrics
    _populate(registry)

    # when rendered for a plain scraper and for an OpenMetrics one
    text, text_type = render_metrics(None, registry)
    open_metrics, open_type = render_metrics("application/openmetrics-text; version=1.0.0", registry)

    # then each gets its format
    assert text_type.startswith("text/plain")
    assert open_type.startswith("application/openmetrics-text")
    assert open_metrics.rstrip().endswith(b"# EOF")
    assert b"smallfirst_jobs_submitted_total" in text


def test_reading_queue_lengths_does_not_consume_messages(
        celery_app: Celery, redis_url: str, registry: CollectorRegistry, queue_collector: QueueCollector) -> None:
    # given one waiting message
    Publisher(celery_app).publish_jobs([new_job()])

    # when the queue length is scraped twice
    first = sample(registry, "smallfirst_queue_length", queue=k.QUEUE_SMALL)
    second = sample(registry, "smallfirst_queue_length", queue=k.QUEUE_SMALL)

    # then both scrapes see it, and it is still there for a worker
    assert (first, second) == (1, 1)
    assert sum(redis.Redis.from_url(redis_url).llen(key) for key in k.priority_list_keys(k.QUEUE_SMALL)) == 1

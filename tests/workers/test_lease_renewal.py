"""A running attempt keeps its job for as long as it runs, however slow, and no longer.

Real Redis and the real job store; the clock is the test's, and renewal rounds are run by the test
(`LeaseKeeper.renew_all`), so nothing here waits on time."""

from __future__ import annotations

import pytest
from celery import Celery

from smallfirst.common import constants as k
from smallfirst.common import lifecycle
from smallfirst.common.catalog import Catalog
from smallfirst.common.execution import JobExecution
from smallfirst.common.jobs import Job, JobStatus, Priority, RouteDecision, RouteReason, Tier
from smallfirst.common.queues import Publisher
from smallfirst.common.store import JobStore

LEASE_S = 10.0
TASK = "banking77_intent"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def execution_of(job_store: JobStore, celery_app: Celery, catalog: Catalog, clock: Clock, worker: str) -> JobExecution:
    return JobExecution(job_store, Publisher(celery_app), catalog, lease_s=LEASE_S, worker_name=worker, clock=clock)


@pytest.fixture
def worker_a(job_store: JobStore, celery_app: Celery, catalog: Catalog, clock: Clock) -> JobExecution:
    return execution_of(job_store, celery_app, catalog, clock, "worker-a")


@pytest.fixture
def worker_b(job_store: JobStore, celery_app: Celery, catalog: Catalog, clock: Clock) -> JobExecution:
    return execution_of(job_store, celery_app, catalog, clock, "worker-b")


@pytest.fixture
def queued_job(job_store: JobStore, clock: Clock) -> Job:
    job = Job(id="job_lease", tenant="acme", task=TASK, input={"text": "Where is my new card?"},
              priority=Priority.NORMAL, route=RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT),
              created_at=clock.now, updated_at=clock.now, queued_at=clock.now)
    job_store.create(job)
    return job


def sweeper_due_at(job_store: JobStore, job_id: str) -> float | None:
    return job_store.redis.zscore(k.ACTIVE_JOBS_KEY, job_id)


def test_a_slow_attempt_keeps_its_job_past_the_first_lease_while_it_is_held(
        worker_a: JobExecution, worker_b: JobExecution, job_store: JobStore, queued_job: Job, clock: Clock) -> None:
    # given worker A runs an attempt inside `claimed`
    with worker_a.claimed(queued_job.id, Tier.SMALL, "delivery-1") as ctx:
        assert ctx is not None
        # when the attempt runs four lease lengths, with a renewal round every third of a lease
        for _ in range(12):
            clock.now += LEASE_S / 3
            worker_a.leases.renew_all()
        # then a redelivery of the same job to worker B is refused: the attempt is still leased
        assert worker_b.begin(queued_job.id, Tier.SMALL, "delivery-2") is None
        job = job_store.get(queued_job.id)
        assert job.status is JobStatus.RUNNING
        assert job.attempts[-1].lease_expires_at == pytest.approx(clock.now + LEASE_S)
        # and the sweeper will look at the job only once that lease runs out
        assert sweeper_due_at(job_store, queued_job.id) == pytest.approx(clock.now + LEASE_S)
    assert [a.worker for a in job_store.get(queued_job.id).attempts] == ["worker-a"]


def test_an_attempt_whose_worker_stopped_renewing_is_taken_over_once_its_lease_runs_out(
        worker_a: JobExecution, worker_b: JobExecution, job_store: JobStore, queued_job: Job, clock: Clock) -> None:
    # given worker A began an attempt and then died (no renewal rounds run)
    ctx = worker_a.begin(queued_job.id, Tier.SMALL, "delivery-1")
    assert ctx is not None
    # when a redelivery reaches worker B after the lease ran out
    clock.now += LEASE_S + 1
    taken = worker_b.begin(queued_job.id, Tier.SMALL, "delivery-2")
    # then B owns a new attempt and A's is abandoned, never billed
    assert taken is not None
    attempts = job_store.get(queued_job.id).attempts
    assert [(a.worker, a.outcome.value, a.billed) for a in attempts] == [
        ("worker-a", "abandoned", False), ("worker-b", "running", False)]


def test_renewal_stops_for_an_attempt_that_was_cancelled_or_taken_over(
        worker_a: JobExecution, worker_b: JobExecution, job_store: JobStore, queued_job: Job, clock: Clock) -> None:
    # given worker A holds a running attempt, and the job is cancelled meanwhile
    with worker_a.claimed(queued_job.id, Tier.SMALL, "delivery-1") as ctx:
        assert ctx is not None
        job_store.transition(queued_job.id, lambda j: lifecycle.cancel(j, now=clock.now))
        lease_when_cancelled = job_store.get(queued_job.id).attempts[-1].lease_expires_at
        # when the next renewal round runs
        clock.now += LEASE_S / 3
        worker_a.leases.renew_all()
        # then the attempt is no longer held, and the cancelled record is untouched
        assert worker_a.leases.held() == 0
        job = job_store.get(queued_job.id)
        assert job.status is JobStatus.CANCELLED
        assert job.attempts[-1].lease_expires_at == lease_when_cancelled


def test_leaving_the_claimed_block_releases_the_attempt_even_when_the_attempt_raised(
        worker_a: JobExecution, queued_job: Job) -> None:
    # given an attempt that raises inside `claimed`
    held_while_running: list[int] = []

    def attempt() -> None:
        with worker_a.claimed(queued_job.id, Tier.SMALL, "delivery-1") as ctx:
            assert ctx is not None
            held_while_running.append(worker_a.leases.held())
            raise RuntimeError("executor bug")

    with pytest.raises(RuntimeError):
        attempt()
    assert held_while_running == [1]
    # then nothing keeps renewing its lease, so the sweeper takes the job over after it
    assert worker_a.leases.held() == 0

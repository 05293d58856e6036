"""Fair scheduling across tenants (smallfirst.common.fair): weighted deficit round robin over the
tenants' lists, strict priorities, a shallow tier queue, and no job lost when a dispatcher dies
between taking entries and sending their messages. Real Redis and real Celery publishing, no worker:
the tier queues are read as a worker would read them."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from smallfirst.cli.tenants import command as tenant_command
from smallfirst.common import constants as k
from smallfirst.common.fair import FairQueues
from smallfirst.common.jobs import Job, JobStatus, Priority, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.metrics import QueueCollector
from smallfirst.common.queues import Publisher, make_celery
from smallfirst.common.runtime import Dispatcher, Sweeper, queue_depth
from smallfirst.common.settings import CoreSettings
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import TenantRegistry
from tests.workers.test_sweeper import STALE_AFTER_S, queued_job_ids, store_as_the_api_does

OUTBOX_GRACE_S = 5.0


def make_job(tenant: str, priority: Priority = Priority.NORMAL, tier: Tier = Tier.SMALL) -> Job:
    now = time.time()
    return Job(id=new_job_id(), tenant=tenant, task="banking77_intent", input={"text": "where is my card"},
               priority=priority, route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT),
               created_at=now, updated_at=now, queued_at=now, traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def publisher(redis_url: str, catalog_path: Path, client: redis.Redis) -> Iterator[Publisher]:
    app = make_celery(CoreSettings.model_validate({"redis_url": redis_url, "catalog_path": catalog_path}))
    yield Publisher(app, FairQueues(client))
    app.close()


def tenants_of(fair: FairQueues, jobs: dict[str, Job], queue: str, room: int, refills: int) -> list[str]:
    """The tenants of the entries `refills` refills of `room` take, in order."""
    order: list[str] = []
    for _ in range(refills):
        order += [jobs[entry.job_id].tenant for entry in fair.refill(queue, room)]
    return order


def enqueue(fair: FairQueues, counts: dict[str, int], priority: Priority = Priority.NORMAL) -> dict[str, Job]:
    jobs = [make_job(tenant, priority) for tenant, count in counts.items() for _ in range(count)]
    fair.enqueue(jobs)
    return {job.id: job for job in jobs}


@pytest.mark.parametrize("room", [1, 3, 100])
def test_tenants_are_served_in_turn_each_as_many_per_round_as_its_weight(client: redis.Redis, room: int) -> None:
    # given tenant a of weight 2 with a large batch, b of weight 1 with a large batch, c with two jobs
    registry = TenantRegistry(client)
    registry.create("A", tenant_id="a", limits={"fair_weight": 2})
    registry.create("B", tenant_id="b")
    fair = FairQueues(client)
    jobs = enqueue(fair, {"a": 20, "b": 20, "c": 2})

    # when the dispatcher takes the first 14 entries, whatever room each refill has
    order = tenants_of(fair, jobs, k.QUEUE_SMALL, room, refills=-(-14 // room))[:14]

    # then a gets two per round, b and c one, and c leaves the ring once its list is empty
    assert order == ["a", "a", "b", "c", "a", "a", "b", "c", "a", "a", "b", "a", "a", "b"]


def test_priorities_stay_strict_across_tenants(client: redis.Redis) -> None:
    # given normal work of a, low work of b, then high work of c
    fair = FairQueues(client)
    jobs = enqueue(fair, {"a": 3}, Priority.NORMAL)
    jobs |= enqueue(fair, {"b": 3}, Priority.LOW)
    jobs |= enqueue(fair, {"c": 2}, Priority.HIGH)

    # when
    entries = fair.refill(k.QUEUE_SMALL, 100)

    # then high first, then normal, then low, each at its priority step
    assert [jobs[e.job_id].tenant for e in entries] == ["c", "c", "a", "a", "a", "b", "b", "b"]
    assert [e.step for e in entries] == [k.PRIORITY_HIGH] * 2 + [k.PRIORITY_NORMAL] * 3 + [k.PRIORITY_LOW] * 3


def test_a_late_tenants_job_is_taken_within_one_round_whatever_the_others_backlog(client: redis.Redis) -> None:
    # given tenant a with 5,000 queued jobs (weight 3), some already dispatched
    TenantRegistry(client).create("A", tenant_id="a", limits={"fair_weight": 3})
    fair = FairQueues(client)
    jobs = enqueue(fair, {"a": 5000})
    tenants_of(fair, jobs, k.QUEUE_SMALL, room=4, refills=5)

    # when tenant b submits one job and the dispatcher goes on one entry at a time
    jobs |= enqueue(fair, {"b": 1})
    order = tenants_of(fair, jobs, k.QUEUE_SMALL, room=1, refills=4)

    # then b's job is taken before a's next round is over (at most a's weight of entries before it)
    assert "b" in order
    assert order.index("b") <= 3
    assert fair.backlog(k.QUEUE_SMALL) == 5001 - 20 - 4


def test_the_dispatcher_keeps_the_tier_queue_at_its_depth(client: redis.Redis, publisher: Publisher) -> None:
    # given 50 queued jobs of one tenant published through the fair lists
    jobs = [make_job("a") for _ in range(50)]
    publisher.publish_jobs(jobs)
    assert queue_depth(client, k.QUEUE_SMALL) == 0
    dispatcher = Dispatcher(publisher.fair, publisher, k.QUEUE_SMALL, depth=4)  # type: ignore[arg-type]

    # when it refills twice, then once after a worker took one message
    first = dispatcher.dispatch_once()
    second = dispatcher.dispatch_once()
    client.rpop(k.QUEUE_SMALL + k.PRIORITY_SEP + str(k.PRIORITY_NORMAL))
    third = dispatcher.dispatch_once()

    # then the queue never holds more than its depth, in the jobs' order, and the backlog shrinks
    assert (first, second, third) == (4, 0, 1)
    assert queue_depth(client, k.QUEUE_SMALL) == 4
    assert queued_job_ids(client, k.QUEUE_SMALL) == [job.id for job in jobs[1:5]][::-1]
    assert publisher.fair is not None
    assert publisher.fair.backlog(k.QUEUE_SMALL) == 45
    assert client.zcard(k.FAIR_DISPATCHING_KEY) == 0


def test_retries_escalations_and_running_jobs_are_published_directly(client: redis.Redis,
                                                                     publisher: Publisher) -> None:
    # given
    queued, retried, escalated = make_job("a"), make_job("a"), make_job("a", tier=Tier.FRONTIER)
    escalated.status = JobStatus.ESCALATED

    # when
    publisher.publish_job(queued)
    publisher.publish_job(retried, countdown_s=30)
    publisher.publish_escalation(escalated)

    # then only the queued job's first delivery waits in its tenant's fair list
    assert client.lrange(k.fair_tenant_list_key(k.QUEUE_SMALL, k.PRIORITY_NORMAL, "a"), 0, -1) == [
        f"{queued.id} {queued.traceparent}".encode()]
    assert queued_job_ids(client, k.QUEUE_SMALL) == [retried.id]
    assert queued_job_ids(client, k.QUEUE_ESCALATION) == [escalated.id]


def test_a_dispatcher_that_dies_before_sending_leaves_its_jobs_to_the_sweeper(
        redis_url: str, client: redis.Redis, publisher: Publisher) -> None:
    # given a job accepted as the API does and put in its fair list
    job = make_job("a")
    store_as_the_api_does(redis_url, [job])
    publisher.publish_jobs([job])
    store = JobStore(client, retention_s=3600, stale_after_s=STALE_AFTER_S)
    store.published([job.id])
    # and a dispatcher that took it (the script) and died before sending its message
    now = time.time()
    assert publisher.fair is not None
    assert [e.job_id for e in publisher.fair.refill(k.QUEUE_SMALL, 4, now=now)] == [job.id]
    sweeper = Sweeper(store, publisher, outbox_grace_s=OUTBOX_GRACE_S)

    # when the sweeper runs within the grace, then after it
    early = sweeper.sweep_once(now + 1)
    late = sweeper.sweep_once(now + OUTBOX_GRACE_S + 1)

    # then the job's message is published straight to its tier queue once, after the grace
    assert early["undispatched"] == 0
    assert late["undispatched"] == 1
    assert queued_job_ids(client, k.QUEUE_SMALL) == [job.id]
    assert client.zcard(k.FAIR_DISPATCHING_KEY) == 0
    assert publisher.fair.backlog(k.QUEUE_SMALL) == 0


def test_a_job_waiting_long_in_its_fair_list_gets_one_duplicate_per_progress_deadline(
        redis_url: str, client: redis.Redis, publisher: Publisher) -> None:
    # given a job waiting in its fair list (behind a backlog, say)
    job = make_job("a")
    store_as_the_api_does(redis_url, [job])
    publisher.publish_jobs([job])
    store = JobStore(client, retention_s=3600, stale_after_s=STALE_AFTER_S)
    store.published([job.id])
    sweeper = Sweeper(store, publisher, outbox_grace_s=OUTBOX_GRACE_S)
    late = time.time() + STALE_AFTER_S + 1

    # when the sweeper runs many times once it is past its progress deadline
    counts = [sweeper.sweep_once(late)["republished"] for _ in range(5)]

    # then it was re-published once (through the fair list), not on every sweep
    assert counts == [1, 0, 0, 0, 0]
    assert client.llen(k.fair_tenant_list_key(k.QUEUE_SMALL, k.PRIORITY_NORMAL, "a")) == 2
    assert queue_depth(client, k.QUEUE_SMALL) == 0


def test_fair_keys_have_a_ttl_or_a_documented_reason(client: redis.Redis) -> None:
    # given entries of two tenants, a refill that stops in the middle of a weighted turn, a lock
    TenantRegistry(client).create("A", tenant_id="a", limits={"fair_weight": 3})
    fair = FairQueues(client)
    enqueue(fair, {"a": 5, "b": 5})
    fair.refill(k.QUEUE_SMALL, 2)
    assert fair.elect(k.QUEUE_SMALL, "me", 5)

    # when / then
    undocumented = [key.decode() for key in client.scan_iter(match=f"{k.KEY_PREFIX}fair:*")
                    if client.ttl(key) == -1
                    and not any(fnmatch.fnmatchcase(key.decode(), p) for p in k.KEYS_WITHOUT_TTL)]
    assert undocumented == []
    assert client.ttl(k.fair_deficit_key(k.QUEUE_SMALL, k.PRIORITY_NORMAL)) > 0
    assert client.ttl(k.fair_wake_key(k.QUEUE_SMALL)) > 0


def test_one_dispatcher_per_queue_is_elected(client: redis.Redis) -> None:
    fair = FairQueues(client)
    assert fair.elect(k.QUEUE_SMALL, "one", 5)
    assert not fair.elect(k.QUEUE_SMALL, "two", 5)
    assert fair.elect(k.QUEUE_FRONTIER, "two", 5)
    fair.resign(k.QUEUE_SMALL, "one")
    assert fair.elect(k.QUEUE_SMALL, "two", 5)


def test_the_queue_length_gauge_counts_the_fair_backlog(redis_url: str, client: redis.Redis) -> None:
    # given
    enqueue(FairQueues(client), {"a": 7, "b": 3})
    collector = QueueCollector(redis_url, queues=[k.QUEUE_SMALL, k.QUEUE_WEBHOOKS])

    # when
    length = next(m for m in collector.collect() if m.name == "smallfirst_queue_length")

    # then
    assert {s.labels["queue"]: s.value for s in length.samples} == {k.QUEUE_SMALL: 10, k.QUEUE_WEBHOOKS: 0}
    collector.close()


def test_the_fair_weight_is_set_with_the_cli_and_shown(redis_url: str, client: redis.Redis) -> None:
    # given
    TenantRegistry(client).create("A", tenant_id="a")
    env = {"SMALLFIRST_REDIS_URL": redis_url}

    # when
    set_it = CliRunner().invoke(tenant_command, ["update", "a", "--fair-weight", "4"], env=env)
    by_name = CliRunner().invoke(tenant_command, ["update", "a", "--set", "fair_weight=none"], env=env)
    refused = CliRunner().invoke(tenant_command, ["update", "a", "--set", "fair_weight=0"], env=env)
    listed = CliRunner().invoke(tenant_command, ["list"], env=env)

    # then
    assert set_it.exit_code == 0, set_it.output
    assert '"fair_weight": 4' in set_it.output
    assert by_name.exit_code == 0, by_name.output
    assert '"fair_weight": 1' in by_name.output
    assert refused.exit_code != 0
    assert '"fair_weight": 1' in listed.output
    assert TenantRegistry(client).get("a").fair_weight == 1


def test_a_refill_reads_the_room_left_itself_and_says_whether_entries_still_wait(
        client: redis.Redis, publisher: Publisher) -> None:
    # given 6 queued jobs in the fair lists and one message already waiting in the tier queue
    fair = publisher.fair
    assert fair is not None
    jobs = [make_job("a") for _ in range(6)]
    publisher.publish_jobs(jobs)
    publisher.publish_job(make_job("b"), direct=True)
    counted = [k.priority_list_keys(k.QUEUE_SMALL)[k.PRIORITY_STEPS.index(step)] for step in k.FAIR_STEPS]

    # when two refills to a depth of 4 run, then one after the tier queue emptied
    first, first_waiting = fair.take(k.QUEUE_SMALL, 4, counted=counted)
    for entry in first:
        publisher.dispatch(k.QUEUE_SMALL, [entry])
    second, second_waiting = fair.take(k.QUEUE_SMALL, 4, counted=counted)
    client.delete(*counted)
    third, third_waiting = fair.take(k.QUEUE_SMALL, 4, counted=counted)

    # then the first takes the room left (3), the second none, the third the rest, and only then
    # is nothing left waiting
    assert [e.job_id for e in first + second + third] == [job.id for job in jobs]
    assert (len(first), len(second), len(third)) == (3, 0, 3)
    assert (first_waiting, second_waiting, third_waiting) == (True, True, False)
    assert fair.backlog(k.QUEUE_SMALL) == 0


def test_a_task_start_wakes_the_dispatcher_only_while_entries_wait(client: redis.Redis) -> None:
    # given no entry in the small queue's fair lists
    fair = FairQueues(client)
    client.delete(k.fair_wake_key(k.QUEUE_SMALL))

    # when a worker nudges, then again after a job was enqueued and its wake-up taken
    idle = fair.nudge([k.QUEUE_SMALL])
    idle_wake = client.llen(k.fair_wake_key(k.QUEUE_SMALL))
    fair.enqueue([make_job("a")])
    client.delete(k.fair_wake_key(k.QUEUE_SMALL))
    busy = fair.nudge([k.QUEUE_SMALL, k.QUEUE_FRONTIER])

    # then only the nudge with an entry waiting wakes the small queue's dispatcher (and not the
    # frontier's, which has nothing waiting)
    assert (idle, idle_wake) == (0, 0)
    assert busy == 1
    assert client.llen(k.fair_wake_key(k.QUEUE_SMALL)) == 1
    assert client.ttl(k.fair_wake_key(k.QUEUE_SMALL)) > 0
    assert client.llen(k.fair_wake_key(k.QUEUE_FRONTIER)) == 0

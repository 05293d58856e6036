"""Several queued small-tier jobs in one Celery message (`TASK_RUN_SMALL_MANY`): how a dispatcher
groups a refill's entries, and what the task does with its jobs' ends. The dispatcher tests use a real
Redis and real Celery publishing (no worker: the queue is read as a worker reads it); the task is run
eagerly, with runners that stand for the jobs' deliveries. The whole path on a running stack is in
`test_a_batch_of_small_jobs_ends_once_each_through_multi_job_messages` (tests/e2e)."""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from celery import Celery, Task
from celery.exceptions import Retry

from smallfirst.common import constants as k
from smallfirst.common.jobs import Priority, Tier
from smallfirst.common.queues import Publisher
from smallfirst.common.runtime import Dispatcher
from smallfirst.common.worker_app import register_jobs_task
from tests.unit import test_fair_scheduling as fair_tests
from tests.unit.test_fair_scheduling import make_job

# The fair-scheduling tests' fixtures: a Redis client, and a publisher through the fair lists.
client = fair_tests.client
publisher = fair_tests.publisher

DEPTH = 4
PER_MESSAGE = 8


def queued_messages(client: redis.Redis, queue: str) -> list[tuple[str, list[str], list[str | None]]]:
    """(task name, job ids, traceparents) of each message waiting in `queue`, oldest first."""
    messages = []
    for key in k.priority_list_keys(queue):
        for raw in reversed(client.lrange(key, 0, -1)):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            task = message["headers"]["task"]
            if task == k.TASK_RUN_SMALL_MANY:
                messages.append((task, args[0], args[1]))
            else:
                messages.append((task, [args[0]], [message["headers"].get(k.HEADER_TRACEPARENT)]))
    return messages


def test_a_refill_under_load_sends_full_multi_job_messages_and_keeps_the_depth_in_messages(
        client: redis.Redis, publisher: Publisher) -> None:
    # given 50 queued jobs of one tenant in the small queue's fair lists
    jobs = [make_job("a") for _ in range(50)]
    publisher.publish_jobs(jobs)
    dispatcher = Dispatcher(publisher.fair, publisher, k.QUEUE_SMALL, depth=DEPTH,  # type: ignore[arg-type]
                            jobs_per_message=PER_MESSAGE)

    # when it refills twice, then once after a worker took one message
    first = dispatcher.dispatch_once()
    second = dispatcher.dispatch_once()
    client.rpop(k.QUEUE_SMALL + k.PRIORITY_SEP + str(k.PRIORITY_NORMAL))
    third = dispatcher.dispatch_once()

    # then the queue holds its depth in messages, each of 8 jobs, with every job's traceparent, in order
    assert (first, second, third) == (DEPTH * PER_MESSAGE, 0, PER_MESSAGE)
    messages = queued_messages(client, k.QUEUE_SMALL)
    assert [task for task, _, _ in messages] == [k.TASK_RUN_SMALL_MANY] * DEPTH
    assert [job_id for _, ids, _ in messages for job_id in ids] == [job.id for job in jobs[PER_MESSAGE:40]]
    assert all(tps == [jobs[0].traceparent] * PER_MESSAGE for _, _, tps in messages)
    assert publisher.fair is not None
    assert publisher.fair.backlog(k.QUEUE_SMALL) == 10
    assert client.zcard(k.FAIR_DISPATCHING_KEY) == 0


def test_a_lone_job_keeps_its_one_job_message_and_priorities_never_share_one(
        client: redis.Redis, publisher: Publisher) -> None:
    # given one high-priority job and three normal ones waiting
    urgent = make_job("a", Priority.HIGH)
    normal = [make_job("a") for _ in range(3)]
    publisher.publish_jobs([urgent, *normal])
    dispatcher = Dispatcher(publisher.fair, publisher, k.QUEUE_SMALL, depth=DEPTH,  # type: ignore[arg-type]
                            jobs_per_message=PER_MESSAGE)

    # when the dispatcher refills
    dispatcher.dispatch_once()

    # then the urgent job travels alone in a one-job message at its own step, the others together
    messages = queued_messages(client, k.QUEUE_SMALL)
    assert messages[0][:2] == (k.TASK_RUN_SMALL, [urgent.id])
    assert messages[1][:2] == (k.TASK_RUN_SMALL_MANY, [job.id for job in normal])


def test_the_frontier_queue_keeps_one_job_per_message(client: redis.Redis, publisher: Publisher) -> None:
    # given 10 queued frontier jobs and a frontier dispatcher told 8 jobs a message
    jobs = [make_job("a", tier=Tier.FRONTIER) for _ in range(10)]
    publisher.publish_jobs(jobs)
    dispatcher = Dispatcher(publisher.fair, publisher, k.QUEUE_FRONTIER, depth=DEPTH,  # type: ignore[arg-type]
                            jobs_per_message=PER_MESSAGE)

    # when it refills
    moved = dispatcher.dispatch_once()

    # then it sent its depth of one-job messages: each frontier job holds a long call of its own
    assert moved == DEPTH
    assert [(task, ids) for task, ids, _ in queued_messages(client, k.QUEUE_FRONTIER)] == [
        (k.TASK_RUN_FRONTIER, [job.id]) for job in jobs[:DEPTH]]


class RecordingRunner:
    """Stands for the jobs' deliveries: records each run and its thread, fails the ones it is told to."""

    def __init__(self, failing: dict[str, BaseException] | None = None) -> None:
        self.failing = failing or {}
        self.runs: list[tuple[str, str]] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def run(self, job_id: str, task_id: str) -> None:
        with self.lock:
            self.runs.append((job_id, task_id))
            self.threads.add(threading.current_thread().name)
        if job_id in self.failing:
            raise self.failing[job_id]


@pytest.fixture
def job_threads() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(4, thread_name_prefix="job")
    yield pool
    pool.shutdown()


def many_task(runner: RecordingRunner, pool: ThreadPoolExecutor) -> Task:
    # A name of its own per test: Celery shares task names between the apps of a process.
    app = Celery("multi-job-test", set_as_current=False)
    name = f"{k.TASK_RUN_SMALL_MANY}.{uuid.uuid4().hex}"
    register_jobs_task(app, name, Tier.SMALL, lambda: runner, lambda: pool)
    return app.tasks[name]


def test_every_job_of_a_message_runs_once_on_the_job_threads(job_threads: ThreadPoolExecutor) -> None:
    # given a message of three jobs
    runner = RecordingRunner()
    task = many_task(runner, job_threads)

    # when it is delivered
    result = task.apply(args=[["j1", "j2", "j3"], [None, None, None]],
                                                    task_id="msg-1", throw=True)

    # then each job ran once, under the message's delivery id, on the job threads
    assert result.successful()
    assert sorted(runner.runs) == [("j1", "msg-1"), ("j2", "msg-1"), ("j3", "msg-1")]
    assert all(name.startswith("job") for name in runner.threads)


def test_an_infrastructure_error_gives_back_only_the_jobs_it_stopped(job_threads: ThreadPoolExecutor) -> None:
    # given a message of three jobs, the second of which meets a Redis outage
    runner = RecordingRunner({"j2": redis.ConnectionError("Redis is down")})
    task = many_task(runner, job_threads)

    # when it is delivered
    with pytest.raises(Retry) as retried:
        task.apply(args=[["j1", "j2", "j3"], ["tp1", "tp2", "tp3"]], throw=True)

    # then the others ran to their end and the retry carries only the second, with its traceparent
    assert sorted(job_id for job_id, _ in runner.runs) == ["j1", "j2", "j3"]
    assert retried.value.sig.args == (["j2"], ["tp2"])


def test_a_bug_in_one_job_rejects_the_message_after_the_others_ran(job_threads: ThreadPoolExecutor) -> None:
    # given a message whose first job hits a bug
    runner = RecordingRunner({"j1": ZeroDivisionError("bug")})
    task = many_task(runner, job_threads)

    # when it is delivered
    with pytest.raises(ZeroDivisionError):
        task.apply(args=[["j1", "j2"], [None, None]], throw=True)

    # then the other job still ran (the failed one is left to its lease and the sweeper)
    assert sorted(job_id for job_id, _ in runner.runs) == ["j1", "j2"]


def test_a_message_whose_lists_disagree_is_refused_before_any_job_runs(job_threads: ThreadPoolExecutor) -> None:
    # given a malformed message: two job ids, one traceparent
    runner = RecordingRunner()
    task = many_task(runner, job_threads)

    # when it is delivered, then it fails without running anything
    with pytest.raises(ValueError, match="2 job ids but 1 traceparents"):
        task.apply(args=[["j1", "j2"], [None]], throw=True)
    assert runner.runs == []

"""Shadow samples: the frontier answers, in the background, a job the small tier kept.

The outcome function draws them (`outcome.shadow_sampled`: a task's `shadow_rate` of kept small
answers, never a local-only job's); `JobExecution.finish` publishes them at the lowest priority
on the frontier queue, after the job's result is stored, so a shadow never delays a result. Here
the frontier's answer is compared with the small tier's (none while the tenant is past its
frontier budget; the call's cost counts against it): agreement is counted per task and per
label in the tenant's `/v1/stats` and in Prometheus (an alert fires below the task's target), the
call is billed as shadow cost, and the answer becomes a `shadow` example: a random sample of kept
answers, the unbiased check of the trainer's accuracy estimate.

Batch mode: a sample of a job whose frontier mode came from `auto` (or is batch) is not urgent, so
it goes into the pool's Message Batch buffer (`routing.shadow_frontier_mode`) as request number
`BATCH_SHADOW_ATTEMPT` of its job, billed at the batch price when its result comes back
(`record`, called by the batch lane, with the result's "handled" mark in the same transaction).
An errored or expired shadow request is dropped, not retried: a sample is a random draw, and
dropping one biases nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from prometheus_client import Counter

from smallfirst.common import constants as k
from smallfirst.common.budgets import BudgetLedger, add_spend
from smallfirst.common.catalog import Catalog, Task
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import FrontierMode, Job, JobStatus, Tier, Verdict
from smallfirst.common.routing import shadow_frontier_mode
from smallfirst.common.store import JobNotFound, JobStore
from smallfirst.common.validation import validate
from smallfirst.frontier_worker.batch_lane import batch_params, shadow_request
from smallfirst.frontier_worker.batches import BatchBuffer
from smallfirst.frontier_worker.executor import FrontierExecutor

log = logging.getLogger(__name__)

SHADOW_SAMPLES = Counter("smallfirst_shadow_samples_total",
                         "Shadow samples: kept small-tier answers also answered by the frontier, by agreement",
                         ["task", "agree"])
SHADOW_COST = Counter("smallfirst_shadow_cost_usd_total", "What shadow samples cost at the frontier", ["task"])


class ShadowRunner:
    def __init__(self, store: JobStore, catalog: Catalog, executor: FrontierExecutor, client: redis.Redis,
                 batches: BatchBuffer | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.executor = executor
        self.redis = client
        self.memory = ExampleMemory(client)
        self.budgets = BudgetLedger(client)
        # The pool's batch buffer (None: every sample runs in real time).
        self.batches = batches

    def run(self, job_id: str) -> None:
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            return
        task = self.catalog.get(job.task)
        if task is None or not task.learns or not isinstance(job.result, dict) or job.status is not JobStatus.SUCCEEDED:
            return
        if job.local_only or task.routing.local_only or not job.learning:
            # Never: the outcome function does not draw these; a stray message must not leak an input.
            log.error("job %s: shadow sample refused (local-only or opted out)", job_id)
            return
        budget = self.budgets.state(job.tenant, time.time())
        if budget is not None and budget.exceeded:
            # A shadow sample is a frontier call the tenant pays for: none past its budget.
            log.info("job %s: shadow sample skipped (tenant %s is past its frontier budget)", job_id, job.tenant)
            return
        if self.batches is not None and shadow_frontier_mode(job.route) is FrontierMode.BATCH:
            self._buffer(task, job)
            return
        if not self.redis.set(k.shadow_done_key(job_id), "1", nx=True, ex=k.SHADOW_DONE_TTL_S):
            return
        try:
            answer = self.executor.run(task, job.input)
        except SmallfirstError as exc:
            log.warning("job %s: shadow sample not answered (%s)", job_id, exc.code)
            return
        self.record(task, job, answer.answer, float(answer.cost_usd))

    def _buffer(self, task: Task, job: Job) -> None:
        """The sample's request into the batch buffer, once per job: the "done" mark and the
        request are one transaction, so a redelivered message buffers nothing twice and a crash
        leaves neither."""
        assert self.batches is not None
        params = batch_params(shadow_request(task, job))
        done_key = k.shadow_done_key(job.id)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(done_key)
                    if pipe.exists(done_key):
                        return
                    pipe.multi()
                    pipe.set(done_key, "1", ex=k.SHADOW_DONE_TTL_S)
                    self.batches.add_to(pipe, job.id, k.BATCH_SHADOW_ATTEMPT, params)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        log.info("job %s: shadow sample buffered for a batch", job.id)

    def record(self, task: Task, job: Job, answer: Any, cost_usd: float, verdict: Verdict | None = None,
               effects: Callable[[Any], None] | None = None) -> None:
        """Count a frontier answer to a kept job: agreement, cost, budget spend, and the answer as a
        `shadow` example when it passes validation (`verdict`, when the caller validated it already).
        `effects` ride on the same transaction."""
        if not isinstance(job.result, dict):
            return
        small_label = str(job.result.get("label"))
        label = answer.get("label") if isinstance(answer, dict) else None
        agree = label == small_label
        with self.redis.pipeline(transaction=True) as pipe:
            key = k.stats_key(job.tenant, job.task)
            pipe.hincrby(key, "shadow_samples", 1)
            pipe.hincrby(key, "shadow_agree", int(agree))
            pipe.hincrby(key, f"shadow_label_samples:{small_label}", 1)
            pipe.hincrby(key, f"shadow_label_agree:{small_label}", int(agree))
            pipe.hincrbyfloat(key, "shadow_cost_usd", cost_usd)
            # Counted against the tenant's frontier budget as any frontier call.
            add_spend(pipe, job.tenant, cost_usd, time.time())
            if effects is not None:
                effects(pipe)
            pipe.execute()
        SHADOW_SAMPLES.labels(task.name, str(agree).lower()).inc()
        SHADOW_COST.labels(task.name).inc(cost_usd)
        if verdict is None:
            verdict = validate(task, answer, None, job.input, tier=Tier.FRONTIER)
        if verdict.passed and isinstance(label, str):
            self.memory.record(task, job, label, ExampleSource.SHADOW, model=task.frontier.model)

"""The API's side of learning: feedback on a job, a task's live model, the examples export, and
the dashboard's learning figures (`StoredLearning`).

The example memory is synchronous Redis code shared with the workers; its calls run on worker
threads (`anyio.to_thread`) with their own synchronous client, so the event loop never blocks.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from smallfirst.api.dashboard.views import LearningFigures
from smallfirst.api.errors import ApiError
from smallfirst.api.service import JobService
from smallfirst.common import constants as k
from smallfirst.common.catalog import Task, TaskKind
from smallfirst.common.examples import ExampleMemory, ExampleSource
from smallfirst.common.jobs import AttemptOutcome, Feedback, Job, JobStatus
from smallfirst.common.store import TransitionRefused
from smallfirst.common.tenants import Tenant


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answer: Any = Field(description="The answer the job should have had; for classify tasks {\"label\": ...}.")
    comment: str = Field(default="", max_length=2000)


class Learning:
    def __init__(self, service: JobService, redis_url: str, async_client: aioredis.Redis) -> None:
        self.service = service
        self.redis = async_client
        self._sync = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        self.memory = ExampleMemory(self._sync)

    def close(self) -> None:
        self._sync.close()

    async def feedback(self, tenant: Tenant, job_id: str, body: FeedbackRequest) -> Job:
        """Record the correct answer to the tenant's own ended job, once (a repeat with the same answer
        returns the job; another answer is 409), and keep it as a training example."""
        job = await self.service.get(tenant, job_id)
        task = self.service.task(job.task)
        if not job.status.terminal:
            raise ApiError(409, "job_not_ended", f"job {job_id} has not ended; feedback is on results")
        if task.kind is TaskKind.CLASSIFY:
            label = body.answer.get("label") if isinstance(body.answer, dict) else None
            if label not in task.label_names:
                raise ApiError(422, "invalid_feedback", "the answer must be {\"label\": one of the task's labels}",
                               {"labels": list(task.label_names)})
        if job.feedback is not None:
            if job.feedback.answer == body.answer:
                return job
            raise ApiError(409, "feedback_already_given", f"job {job_id} already has feedback",
                           {"feedback": job.feedback.model_dump(mode="json")})
        accepted = [a for a in job.attempts if a.outcome is AttemptOutcome.ACCEPTED]
        served_by = accepted[-1].tier if accepted and job.status is JobStatus.SUCCEEDED else None
        given = Feedback(answer=body.answer, comment=body.comment, created_at=time.time(),
                         agrees=job.status is JobStatus.SUCCEEDED and job.result == body.answer, served_by=served_by)

        def change(current: Job) -> Job:
            if current.feedback is not None:
                raise TransitionRefused("feedback_already_given")
            current.feedback = given
            current.updated_at = given.created_at
            return current

        try:
            _, job = await self.service.store.transition(job_id, change)
        except TransitionRefused:
            return await self.feedback(tenant, job_id, body)
        if task.learns:
            await anyio.to_thread.run_sync(self._keep, task, job, tenant)
        return job

    def _keep(self, task: Task, job: Job, tenant: Tenant) -> None:
        assert job.feedback is not None
        self.memory.record(task, job, str(job.feedback.answer["label"]), ExampleSource.FEEDBACK, model="feedback",
                           trusted=tenant.feedback_trusted)

    async def model(self, name: str) -> dict[str, Any]:
        """What `GET /v1/tasks/{name}/model` shows: the live head and the task's examples."""
        task = self.service.task(name)
        raw = await self.redis.hget(k.head_key(task.name, task.small.model), "meta")
        meta: dict[str, Any] = json.loads(raw) if raw else {}
        counts = await anyio.to_thread.run_sync(self.memory.counts, task) if task.learns else {}
        return {
            "object": "task_model", "task": task.name, "learning": task.learning.model_dump(mode="json"),
            "embedding_model": task.small.model,
            "scorer": "trained_head" if meta else "seed_nearest_neighbour",
            "live_version": meta.get("version"), "trained_at": meta.get("trained_at"),
            "threshold": meta.get("threshold"), "novelty_floor": meta.get("novelty_floor"),
            "metrics": meta.get("metrics", {}), "examples": counts,
        }

    async def export(self, tenant: Tenant, name: str) -> AsyncIterator[bytes]:
        """The tenant's own examples of a task as JSONL (an operator exports all with the CLI).

        The task is checked and the examples read before the first byte is sent, so that an unknown
        task is a 404 rather than a stream cut short after its 200."""
        task = self.service.task(name)
        examples = [e for e in await anyio.to_thread.run_sync(self.memory.all, task) if e.tenant == tenant.id]

        async def lines() -> AsyncIterator[bytes]:
            for example in examples:
                yield (json.dumps(example.export(), ensure_ascii=False) + "\n").encode()

        return lines()


class StoredLearning:
    """The dashboard's `LearningSource`: a task's live head (version, held-out accuracy, target), the
    viewer's tenants' shadow agreement and their examples per source, next to the catalog's seeds."""

    def __init__(self, learning: Learning) -> None:
        self.learning = learning

    async def figures(self, task: Task, tenant_ids: Sequence[str]) -> LearningFigures:
        seeds = sum(len(label.examples) for label in task.labels)
        by_source: dict[str, int] = {"catalog seed examples": seeds} if task.labels else {}
        if not task.learns:
            return LearningFigures(examples_by_source=by_source)
        raw = await self.learning.redis.hget(k.head_key(task.name, task.small.model), "meta")
        meta: dict[str, Any] = json.loads(raw) if raw else {}
        metrics: dict[str, Any] = meta.get("metrics", {})
        tenants = set(tenant_ids)
        examples = await anyio.to_thread.run_sync(self.learning.memory.all, task)
        for example in examples:
            if example.tenant in tenants:
                by_source[example.source.value] = by_source.get(example.source.value, 0) + 1
        samples = agree = 0
        for tenant_id in tenant_ids:
            counts = await self.learning.redis.hmget(k.stats_key(tenant_id, task.name), ["shadow_samples",
                                                                                          "shadow_agree"])
            samples += int(counts[0] or 0)
            agree += int(counts[1] or 0)
        return LearningFigures(
            model_versions=[{"version": meta["version"], "trained_at": meta.get("trained_at")}]
            if "version" in meta else None,
            shadow_agreement=agree / samples if samples else None,
            heldout_accuracy=metrics.get("held_out_accuracy"),
            target_accuracy=task.learning.target_accuracy,
            examples_by_source=by_source)

"""AsyncJobStore.create_many writes what create writes, job by job, in one transaction."""

from __future__ import annotations

import asyncio
import time

import redis
import redis.asyncio as aioredis

from smallfirst.common import constants as k
from smallfirst.common.jobs import Job, RouteDecision, RouteReason, Tier, new_job_id
from smallfirst.common.store import AsyncJobStore


def make_job(tenant: str, task: str, tier: Tier, created_at: float) -> Job:
    return Job(id=new_job_id(), tenant=tenant, task=task, input={"text": "hello"},
               route=RouteDecision(tier=tier, reason=RouteReason.TASK_DEFAULT), created_at=created_at,
               updated_at=created_at, queued_at=created_at)


def snapshot(client: redis.Redis, tenant: str) -> dict[str, object]:
    """Everything the store keeps for `tenant`, with the tenant id and job ids made comparable."""
    jobs = [m.decode() for m in client.zrange(k.tenant_jobs_key(tenant), 0, -1)]
    stats = {task.decode(): client.hgetall(k.stats_key(tenant, task.decode()))
             for task in client.smembers(k.stats_index_key(tenant))}
    return {
        "jobs": len(jobs),
        "records": [Job.model_validate_json(client.get(k.job_key(i)) or b"").version for i in jobs],
        "record_ttl_ok": all(0 < client.ttl(k.job_key(i)) <= 3600 for i in jobs),
        "index_scores": sorted(int(s) for _, s in client.zrange(k.tenant_jobs_key(tenant), 0, -1, withscores=True)),
        "index_ttl_ok": 0 < client.ttl(k.tenant_jobs_key(tenant)) <= 3600,
        "active": sorted(client.zscore(k.ACTIVE_JOBS_KEY, i) or 0.0 for i in jobs),
        "stats": stats,
    }


def test_create_many_has_the_effects_of_create_for_each_job(redis_url: str) -> None:
    # given: the same jobs, twice, for two tenants
    now = time.time()
    specs = [("banking77_intent", Tier.SMALL), ("banking77_intent", Tier.SMALL), ("email_summary", Tier.FRONTIER)]
    one_by_one = [make_job("t-single", task, tier, now + i) for i, (task, tier) in enumerate(specs)]
    batched = [make_job("t-batch", task, tier, now + i) for i, (task, tier) in enumerate(specs)]

    async def store_both() -> None:
        client = aioredis.Redis.from_url(redis_url)
        store = AsyncJobStore(client, retention_s=3600, stale_after_s=900)
        for job in one_by_one:
            await store.create(job)
        await store.create_many(batched)
        await client.aclose()  # type: ignore[attr-defined]

    # when
    asyncio.run(store_both())

    # then
    client = redis.Redis.from_url(redis_url)
    assert snapshot(client, "t-batch") == snapshot(client, "t-single")
    assert snapshot(client, "t-batch")["jobs"] == 3
    client.close()

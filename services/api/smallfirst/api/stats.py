"""Per-tenant, per-task figures, read from the counters the job store writes.

The store increments `stats_key(tenant, task)` when a job is created (`jobs_submitted`,
`routed:<tier>`) and once when it ends (`jobs_ended`, `status:*`, `served:*`, `escalated`,
`escalation_reason:*`, `cost_usd[:tier]`, tokens, `estimated_frontier_cost_usd`, `savings_usd`,
`error:*`), and for batched frontier attempts `attempts_batched`, `cost_usd:batch`,
`batch_savings_usd`; see `store._stats_fields`. This module only reads and shapes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis.asyncio as aioredis

from smallfirst.api.models import StatsResponse, TaskStats, TierCosts, TierCounts
from smallfirst.common import constants as k
from smallfirst.common.jobs import TERMINAL_STATUSES, Tier

ALL_TASKS = "*"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _num(fields: Mapping[str, float], name: str) -> float:
    return fields.get(name, 0.0)


def _prefixed(fields: Mapping[str, float], prefix: str) -> dict[str, int]:
    return {name[len(prefix):]: int(value) for name, value in sorted(fields.items()) if name.startswith(prefix)}


def task_stats(task: str, fields: Mapping[str, float]) -> TaskStats:
    submitted = int(_num(fields, "jobs_submitted"))
    ended = int(_num(fields, "jobs_ended"))
    escalated = int(_num(fields, "escalated"))
    served_small = int(_num(fields, f"served:{Tier.SMALL.value}"))
    settled_by_small = served_small + escalated
    return TaskStats(
        task=task,
        jobs_submitted=submitted,
        jobs_ended=ended,
        jobs_in_progress=max(0, submitted - ended),
        by_status={status.value: int(_num(fields, f"status:{status.value}")) for status in sorted(TERMINAL_STATUSES)},
        routed=TierCounts(small=int(_num(fields, "routed:small")), frontier=int(_num(fields, "routed:frontier"))),
        served=TierCounts(small=served_small, frontier=int(_num(fields, "served:frontier"))),
        escalated=escalated,
        escalation_rate=round(escalated / settled_by_small, 6) if settled_by_small else None,
        escalation_reasons=_prefixed(fields, "escalation_reason:"),
        errors=_prefixed(fields, "error:"),
        cost_usd=round(_num(fields, "cost_usd"), 8),
        cost_usd_by_tier=TierCosts(small=round(_num(fields, "cost_usd:small"), 8),
                                     frontier=round(_num(fields, "cost_usd:frontier"), 8)),
        input_tokens=int(_num(fields, "input_tokens")),
        output_tokens=int(_num(fields, "output_tokens")),
        estimated_frontier_cost_usd=round(_num(fields, "estimated_frontier_cost_usd"), 8),
        savings_usd=round(_num(fields, "savings_usd"), 8),
        feedback=int(_num(fields, "feedback")),
        shadow_samples=int(_num(fields, "shadow_samples")),
        shadow_agreement=(round(_num(fields, "shadow_agree") / _num(fields, "shadow_samples"), 6)
                          if _num(fields, "shadow_samples") else None),
        shadow_agreement_by_label={
            label: round(_num(fields, f"shadow_label_agree:{label}") / count, 6)
            for label, count in _prefixed(fields, "shadow_label_samples:").items() if count},
        shadow_cost_usd=round(_num(fields, "shadow_cost_usd"), 8),
        feedback_errors=_prefixed(fields, "feedback_errors:"),
        attempts_batched=int(_num(fields, "attempts_batched")),
        batch_cost_usd=round(_num(fields, "cost_usd:batch"), 8),
        batch_savings_usd=round(_num(fields, "batch_savings_usd"), 8),
    )


class StatsReader:
    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client

    async def read(self, tenant_id: str, task: str | None = None) -> StatsResponse:
        if task is None:
            names = sorted(_text(n) for n in await self.redis.smembers(k.stats_index_key(tenant_id)))
        else:
            names = [task]
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(k.stats_key(tenant_id, name))
            raws: list[Any] = await pipe.execute() if names else []
        per_task: list[TaskStats] = []
        totals: dict[str, float] = {}
        for name, raw in zip(names, raws, strict=True):
            fields = {_text(key): float(_text(value)) for key, value in raw.items()}
            for key, value in fields.items():
                totals[key] = totals.get(key, 0.0) + value
            per_task.append(task_stats(name, fields))
        return StatsResponse(tenant=tenant_id, tasks=per_task, totals=task_stats(ALL_TASKS, totals))

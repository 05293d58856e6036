"""Frontier spend budgets per tenant: per UTC day and per UTC month, in US dollars.

Spend is the frontier tier's billed cost, the same figure as `cost_usd_by_tier.frontier` in
`/v1/stats`: the job store adds it to two counters per tenant (`spend_key(tenant, "day", ...)` and
`(..., "month", ...)`) inside the compare-and-set transaction that bills the attempt
(`add_spend`), so a redelivered message never counts twice and the budget never disagrees with the
statistics. Each counter lives a little longer than its period (TTL), then goes away.

A tenant's budget is read with one round trip (`BudgetLedger.state`: its record and both counters)
and judged by pure code (`BudgetState`):

- at `WARN_RATIO` (80 %) of either limit, a warning: a metric, a log record once per period
  (`BudgetLedger.warn_if_near`, deduplicated across processes with SET NX);
- at 100 %, the tenant's `BudgetPolicy` applies to whatever would call the frontier:
  `small_only`  a would-be escalation or a frontier-routed job fails with `budget_exceeded`;
                the small tier goes on serving the tenant;
  `hold`        it waits: re-checked every `HOLD_RECHECK_S` at most (a raised budget is noticed)
                until the period that is over resets, within the job's deadline (then it fails
                with `budget_exceeded`);
  `fail`        as `small_only` for jobs already accepted, and the API refuses new submissions.

The outcome function takes the state as an input (`outcome.within_budget`); the frontier worker
checks it before it calls the provider; the API checks it when it routes a job to the frontier.
"""

from __future__ import annotations

import calendar
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from smallfirst.common import constants as k
from smallfirst.common.errors import SmallfirstError
from smallfirst.common.events import AttemptEnded, JobEvent
from smallfirst.common.jobs import Tier

log = logging.getLogger(__name__)

CODE_BUDGET_EXCEEDED = "budget_exceeded"
WARN_RATIO = 0.8
# A held escalation is looked at again at least this often: a raised budget frees it without
# waiting for the period to end, and no ETA message is held by a worker for hours.
HOLD_RECHECK_S = 600.0
PERIOD_DAY = "day"
PERIOD_MONTH = "month"
PERIODS = (PERIOD_DAY, PERIOD_MONTH)
# A counter outlives its period by this much, so that a late reader (clock skew between hosts)
# still sees it; then it expires.
_SPEND_TTL_SLACK_S = 2 * 24 * 3600

# KEYS: tenants hash, day counter, month counter; ARGV: tenant id. One round trip.
_STATE_SCRIPT = """
return {redis.call('HGET', KEYS[1], ARGV[1]), redis.call('GET', KEYS[2]), redis.call('GET', KEYS[3])}
"""


class BudgetPolicy(StrEnum):
    SMALL_ONLY = "small_only"
    HOLD = "hold"
    FAIL = "fail"


class BudgetExceeded(SmallfirstError):
    """The tenant's frontier budget is spent: the frontier is not called for it.

    Final by default: the outcome function decides, from the tenant's policy, whether the job waits
    (`hold`) or fails."""

    code = CODE_BUDGET_EXCEEDED


def period_id(period: str, at: float) -> str:
    moment = time.gmtime(at)
    return time.strftime("%Y%m%d" if period == PERIOD_DAY else "%Y%m", moment)


def period_end(period: str, at: float) -> float:
    """When the UTC day or month that contains `at` ends (epoch seconds)."""
    moment = time.gmtime(at)
    if period == PERIOD_DAY:
        start = calendar.timegm((moment.tm_year, moment.tm_mon, moment.tm_mday, 0, 0, 0))
        return float(start + 24 * 3600)
    year, month = (moment.tm_year + 1, 1) if moment.tm_mon == 12 else (moment.tm_year, moment.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def spend_ttl_s(period: str, at: float) -> int:
    return int(period_end(period, at) - at) + _SPEND_TTL_SLACK_S


@dataclass(frozen=True)
class PeriodSpend:
    period: str
    limit_usd: float | None
    spent_usd: float
    resets_at: float

    @property
    def used_ratio(self) -> float | None:
        if self.limit_usd is None:
            return None
        if self.limit_usd <= 0:
            return 1.0 if self.spent_usd > 0 else 0.0
        return self.spent_usd / self.limit_usd

    @property
    def exceeded(self) -> bool:
        return self.limit_usd is not None and self.spent_usd >= self.limit_usd

    @property
    def near(self) -> bool:
        ratio = self.used_ratio
        return ratio is not None and ratio >= WARN_RATIO

    def public(self) -> dict[str, Any]:
        return {"limit_usd": self.limit_usd, "spent_usd": round(self.spent_usd, 8),
                "used_ratio": None if self.used_ratio is None else round(self.used_ratio, 6),
                "resets_at": self.resets_at}


@dataclass(frozen=True)
class BudgetState:
    policy: BudgetPolicy
    day: PeriodSpend
    month: PeriodSpend

    @property
    def periods(self) -> tuple[PeriodSpend, PeriodSpend]:
        return (self.day, self.month)

    @property
    def exceeded(self) -> bool:
        return any(p.exceeded for p in self.periods)

    @property
    def near(self) -> bool:
        return any(p.near for p in self.periods)

    @property
    def status(self) -> str:
        return "exceeded" if self.exceeded else "warning" if self.near else "ok"

    @property
    def resets_at(self) -> float:
        """When the frontier is open again without a raised budget: every period that is over reset."""
        over = [p.resets_at for p in self.periods if p.exceeded]
        return max(over) if over else 0.0

    def hold_s(self, now: float) -> float:
        """How long a held escalation waits before it is looked at again."""
        return max(1.0, min(HOLD_RECHECK_S, self.resets_at - now))

    def error(self) -> BudgetExceeded:
        over = [p for p in self.periods if p.exceeded]
        names = " and ".join(p.period for p in over) or "frontier"
        return BudgetExceeded(f"the tenant's {names} frontier budget is spent", details={
            "policy": self.policy.value, **{p.period: p.public() for p in over}}, retry_after_s=self.resets_at)

    def public(self) -> dict[str, Any]:
        return {"policy": self.policy.value, "status": self.status, PERIOD_DAY: self.day.public(),
                PERIOD_MONTH: self.month.public()}


def budget_state(record: dict[str, Any], day_spent_usd: float, month_spent_usd: float, now: float) -> BudgetState:
    """The state of a tenant's budget from its stored record's fields and the two counters."""
    return BudgetState(
        policy=BudgetPolicy(record.get("budget_policy") or BudgetPolicy.SMALL_ONLY),
        day=PeriodSpend(PERIOD_DAY, record.get("budget_daily_usd"), day_spent_usd, period_end(PERIOD_DAY, now)),
        month=PeriodSpend(PERIOD_MONTH, record.get("budget_monthly_usd"), month_spent_usd,
                          period_end(PERIOD_MONTH, now)))


def has_budget(record: dict[str, Any]) -> bool:
    return record.get("budget_daily_usd") is not None or record.get("budget_monthly_usd") is not None


def add_spend(pipe: Any, tenant_id: str, amount_usd: float, at: float) -> None:
    """Queue the spend counters' increments on a pipeline in MULTI (the transaction that bills)."""
    if amount_usd <= 0:
        return
    for period in PERIODS:
        key = k.spend_key(tenant_id, period, period_id(period, at))
        pipe.incrbyfloat(key, amount_usd)
        pipe.expire(key, spend_ttl_s(period, at))


def frontier_spend(events: Iterable[JobEvent]) -> float:
    """The frontier tier's billed cost among a transition's events."""
    return sum((float(e.cost_usd) for e in events
                if isinstance(e, AttemptEnded) and e.billed and e.tier is Tier.FRONTIER), 0.0)


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.used = Gauge("smallfirst_tenant_budget_used_ratio",
                          "Share of a tenant's frontier budget spent in the current period, by period.",
                          ["tenant", "period"], registry=reg)
        self.warnings = Counter("smallfirst_tenant_budget_warnings",
                                "Tenants that reached 80 % of a frontier budget (once per tenant and period).",
                                ["tenant", "period"], registry=reg)
        self.refused = Counter("smallfirst_tenant_budget_refusals",
                               "Frontier work held or failed because the tenant's budget was spent.",
                               ["tenant", "policy"], registry=reg)

    def observe(self, tenant_id: str, state: BudgetState) -> None:
        for spend in state.periods:
            if spend.used_ratio is not None:
                self.used.labels(tenant_id, spend.period).set(spend.used_ratio)


_default_metrics: list[BudgetMetrics] = []


def default_budget_metrics() -> BudgetMetrics:
    if not _default_metrics:
        _default_metrics.append(BudgetMetrics())
    return _default_metrics[0]


def _float(raw: Any) -> float:
    return float(raw) if raw is not None else 0.0


class BudgetLedger:
    """Reads tenants' budget states (blocking client: the worker pools)."""

    def __init__(self, client: Any, metrics: BudgetMetrics | None = None) -> None:
        self.redis = client
        self.metrics = metrics
        self._state = client.register_script(_STATE_SCRIPT)

    def state(self, tenant_id: str, now: float) -> BudgetState | None:
        """The tenant's budget state, or None when the tenant has no budget (or no record)."""
        raw, day, month = self._state(keys=[k.TENANTS_KEY, k.spend_key(tenant_id, PERIOD_DAY,
                                                                       period_id(PERIOD_DAY, now)),
                                            k.spend_key(tenant_id, PERIOD_MONTH, period_id(PERIOD_MONTH, now))],
                                      args=[tenant_id])
        if raw is None:
            return None
        record = json.loads(raw)
        if not has_budget(record):
            return None
        state = budget_state(record, _float(day), _float(month), now)
        if self.metrics is not None:
            self.metrics.observe(tenant_id, state)
        return state

    def warn_if_near(self, tenant_id: str, now: float) -> BudgetState | None:
        """After spending: log and count the 80 % warning once per tenant and period."""
        state = self.state(tenant_id, now)
        if state is None:
            return None
        for spend in state.periods:
            if not spend.near:
                continue
            marker = k.budget_warned_key(tenant_id, spend.period, period_id(spend.period, now))
            if self.redis.set(marker, "1", nx=True, ex=spend_ttl_s(spend.period, now)):
                log.warning("tenant %s has spent %.4f of its %s frontier budget of %.4f USD (%.0f %%); policy %s",
                            tenant_id, spend.spent_usd, spend.period, spend.limit_usd or 0.0,
                            100 * (spend.used_ratio or 0.0), state.policy.value,
                            extra={"event": "budget_warning", "tenant": tenant_id, "period": spend.period})
                if self.metrics is not None:
                    self.metrics.warnings.labels(tenant_id, spend.period).inc()
        return state


class AsyncBudgetLedger:
    """The same reads for the API (asyncio client)."""

    def __init__(self, client: Any) -> None:
        self.redis = client
        self._state = client.register_script(_STATE_SCRIPT)

    async def state(self, tenant_id: str, now: float) -> BudgetState | None:
        raw, day, month = await self._state(
            keys=[k.TENANTS_KEY, k.spend_key(tenant_id, PERIOD_DAY, period_id(PERIOD_DAY, now)),
                  k.spend_key(tenant_id, PERIOD_MONTH, period_id(PERIOD_MONTH, now))], args=[tenant_id])
        if raw is None:
            return None
        record = json.loads(raw)
        if not has_budget(record):
            return None
        return budget_state(record, _float(day), _float(month), now)

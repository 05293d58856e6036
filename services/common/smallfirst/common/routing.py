"""The routing policy: which tier a job tries first. A pure function, so it is tested in isolation."""

from __future__ import annotations

from dataclasses import dataclass

from smallfirst.common.catalog import Task
from smallfirst.common.errors import InvalidRequest
from smallfirst.common.jobs import FrontierMode, Priority, RouteDecision, RouteReason, Tier, TierHint

# Without the small model's tokenizer at hand, input length is estimated from characters. Four
# characters a token is the usual figure for English; a low estimate only sends a long input to the
# small tier, whose OUT_OF_RANGE answer then escalates it.
CHARS_PER_TOKEN = 4


class RoutingConflict(InvalidRequest, ValueError):
    """The job asks for something the policy forbids (a frontier hint on a local-only job)."""

    code = "local_only_conflict"


@dataclass(frozen=True)
class RouteRequest:
    task: Task
    input_chars: int
    tier_hint: TierHint = TierHint.AUTO
    job_local_only: bool = False
    tenant_local_only: bool = False
    priority: Priority = Priority.NORMAL
    # The job asks for this frontier mode / the tenant's setting (None: not set at that level).
    job_frontier_mode: FrontierMode | None = None
    tenant_frontier_mode: FrontierMode | None = None
    # A shadow sample (frontier work that checks the small tier, never urgent).
    shadow: bool = False


def decide_frontier_mode(request: RouteRequest) -> tuple[FrontierMode, str]:
    """(batch or realtime, which level chose it): the job's mode overrides the tenant's, which
    overrides the task's; `auto` sends `low` priority and shadow work to batches."""
    for source, mode in (("job", request.job_frontier_mode), ("tenant", request.tenant_frontier_mode),
                         ("task", request.task.routing.frontier_mode)):
        if mode is None:
            continue
        if mode is not FrontierMode.AUTO:
            return mode, source
        if request.shadow:
            return FrontierMode.BATCH, f"{source}:auto:shadow"
        if request.priority is Priority.LOW:
            return FrontierMode.BATCH, f"{source}:auto:low_priority"
        return FrontierMode.REALTIME, f"{source}:auto:{request.priority.value}_priority"
    return FrontierMode.REALTIME, "default"


def shadow_frontier_mode(route: RouteDecision) -> FrontierMode:
    """How a shadow sample of a job with `route` goes out: as the job's own frontier work when a
    level chose batch or realtime outright, and in a batch when the level that decided said `auto`
    (a shadow sample is never urgent). The route keeps which level decided, so the rule needs no
    second look at the tenant's or the task's settings."""
    if route.frontier_mode is FrontierMode.BATCH or ":auto:" in route.frontier_mode_source:
        return FrontierMode.BATCH
    return FrontierMode.REALTIME


def is_local_only(request: RouteRequest) -> bool:
    return request.job_local_only or request.tenant_local_only or request.task.routing.local_only


def decide_route(request: RouteRequest) -> RouteDecision:
    decision = _decide_tier(request)
    mode, source = decide_frontier_mode(request)
    return decision.model_copy(update={"frontier_mode": mode, "frontier_mode_source": source})


def _decide_tier(request: RouteRequest) -> RouteDecision:
    local_only = is_local_only(request)
    if request.tier_hint is TierHint.FRONTIER:
        if local_only:
            raise RoutingConflict("a local_only job cannot be sent to the frontier tier")
        return RouteDecision(tier=Tier.FRONTIER, reason=RouteReason.HINT, detail="caller asked for frontier")
    if request.tier_hint is TierHint.SMALL:
        return RouteDecision(tier=Tier.SMALL, reason=RouteReason.HINT, detail="caller asked for small")
    if local_only:
        return RouteDecision(tier=Tier.SMALL, reason=RouteReason.LOCAL_ONLY,
                             detail="local_only: the job never leaves the self-hosted tier")
    estimated_tokens = -(-request.input_chars // CHARS_PER_TOKEN)
    # Leave room in the small model's context for the prompt template and the answer.
    budget_tokens = request.task.small.max_context_tokens - request.task.small.max_tokens
    if estimated_tokens > budget_tokens:
        return RouteDecision(
            tier=Tier.FRONTIER,
            reason=RouteReason.CONTEXT_LENGTH,
            detail=f"~{estimated_tokens} input tokens exceed the small model's budget of {budget_tokens}",
        )
    return RouteDecision(tier=request.task.routing.default_tier, reason=RouteReason.TASK_DEFAULT,
                         detail=f"task default: {request.task.routing.default_tier.value}")

"""The routing policy: which tier a job tries first. A pure function, so it is tested in isolation."""

from __future__ import annotations

from dataclasses import dataclass

from smallfirst.common.catalog import Task
from smallfirst.common.jobs import RouteDecision, RouteReason, Tier, TierHint

# Without the small model's tokenizer at hand, input length is estimated from characters. Four
# characters a token is the usual figure for English; a low estimate only sends a long input to the
# small tier, whose OUT_OF_RANGE answer then escalates it.
CHARS_PER_TOKEN = 4


class RoutingConflict(ValueError):
    """The job asks for something the policy forbids (a frontier hint on a local-only job)."""

    code = "local_only_conflict"


@dataclass(frozen=True)
class RouteRequest:
    task: Task
    input_chars: int
    tier_hint: TierHint = TierHint.AUTO
    job_local_only: bool = False
    tenant_local_only: bool = False


def is_local_only(request: RouteRequest) -> bool:
    return request.job_local_only or request.tenant_local_only or request.task.routing.local_only


def decide_route(request: RouteRequest) -> RouteDecision:
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

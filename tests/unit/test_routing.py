"""The routing policy (a pure function): hints, local-only, context length, task defaults."""

from __future__ import annotations

from typing import Any

import pytest

from smallfirst.common.catalog import Task
from smallfirst.common.jobs import FrontierMode, Priority, RouteDecision, RouteReason, Tier, TierHint
from smallfirst.common.routing import (
    CHARS_PER_TOKEN,
    RouteRequest,
    RoutingConflict,
    decide_frontier_mode,
    decide_route,
    is_local_only,
    shadow_frontier_mode,
)


def make_task(default_tier: Tier = Tier.SMALL, local_only: bool = False, max_context_tokens: int = 512,
              max_tokens: int = 112) -> Task:
    spec: dict[str, Any] = {
        "name": "summary",
        "kind": "generate",
        "routing": {"default_tier": default_tier.value, "local_only": local_only},
        "small": {"model": "tiny", "max_context_tokens": max_context_tokens, "max_tokens": max_tokens},
        "frontier": {"model": "claude-haiku-5-5"},
    }
    return Task.model_validate(spec)


def test_auto_follows_the_task_default() -> None:
    # when
    small = decide_route(RouteRequest(task=make_task(Tier.SMALL), input_chars=100))
    frontier = decide_route(RouteRequest(task=make_task(Tier.FRONTIER), input_chars=100))

    # then
    assert (small.tier, small.reason) == (Tier.SMALL, RouteReason.TASK_DEFAULT)
    assert (frontier.tier, frontier.reason) == (Tier.FRONTIER, RouteReason.TASK_DEFAULT)


@pytest.mark.parametrize(("hint", "tier"), [(TierHint.SMALL, Tier.SMALL), (TierHint.FRONTIER, Tier.FRONTIER)])
def test_explicit_hint_is_honoured_over_the_task_default(hint: TierHint, tier: Tier) -> None:
    # given: a task whose default is the other tier
    task = make_task(Tier.FRONTIER if tier is Tier.SMALL else Tier.SMALL)

    # when
    decision = decide_route(RouteRequest(task=task, input_chars=100, tier_hint=hint))

    # then
    assert (decision.tier, decision.reason) == (tier, RouteReason.HINT)


def test_small_hint_is_honoured_even_for_an_input_beyond_the_small_context() -> None:
    # when
    decision = decide_route(RouteRequest(task=make_task(), input_chars=100_000, tier_hint=TierHint.SMALL))

    # then
    assert decision.tier is Tier.SMALL


@pytest.mark.parametrize("source", ["job", "tenant", "task"])
def test_local_only_from_any_source_keeps_a_frontier_task_small(source: str) -> None:
    # given
    task = make_task(Tier.FRONTIER, local_only=source == "task")
    request = RouteRequest(task=task, input_chars=100_000, job_local_only=source == "job",
                           tenant_local_only=source == "tenant")

    # when
    decision = decide_route(request)

    # then: not even a long input leaves the self-hosted tier
    assert is_local_only(request)
    assert (decision.tier, decision.reason) == (Tier.SMALL, RouteReason.LOCAL_ONLY)


@pytest.mark.parametrize("source", ["job", "tenant", "task"])
def test_frontier_hint_on_a_local_only_job_is_a_conflict(source: str) -> None:
    # given
    request = RouteRequest(task=make_task(local_only=source == "task"), input_chars=10,
                           tier_hint=TierHint.FRONTIER, job_local_only=source == "job",
                           tenant_local_only=source == "tenant")

    # when / then
    with pytest.raises(RoutingConflict) as info:
        decide_route(request)
    assert info.value.code == "local_only_conflict"


def test_input_beyond_the_small_models_budget_goes_to_frontier() -> None:
    # given: 512 tokens of context, 112 kept for the answer: 400 tokens of input fit
    task = make_task(max_context_tokens=512, max_tokens=112)
    fits = 400 * CHARS_PER_TOKEN
    too_long = fits + 1

    # when
    fitting = decide_route(RouteRequest(task=task, input_chars=fits))
    overflowing = decide_route(RouteRequest(task=task, input_chars=too_long))

    # then
    assert fitting.tier is Tier.SMALL
    assert (overflowing.tier, overflowing.reason) == (Tier.FRONTIER, RouteReason.CONTEXT_LENGTH)
    assert "401" in overflowing.detail


# ---- frontier mode: job overrides tenant overrides task; auto batches low priority and shadow ---
def task_with_mode(mode: str) -> Task:
    spec: dict[str, Any] = {
        "name": "summary", "kind": "generate", "routing": {"default_tier": "frontier", "frontier_mode": mode},
        "small": {"model": "tiny"}, "frontier": {"model": "claude-haiku-5-5"},
    }
    return Task.model_validate(spec)


@pytest.mark.parametrize(("task_mode", "tenant_mode", "job_mode", "priority", "shadow", "mode", "source"), [
    ("realtime", None, None, Priority.LOW, False, FrontierMode.REALTIME, "task"),
    ("batch", None, None, Priority.HIGH, False, FrontierMode.BATCH, "task"),
    ("batch", FrontierMode.REALTIME, None, Priority.LOW, False, FrontierMode.REALTIME, "tenant"),
    ("realtime", FrontierMode.REALTIME, FrontierMode.BATCH, Priority.HIGH, False, FrontierMode.BATCH, "job"),
    ("batch", FrontierMode.BATCH, FrontierMode.REALTIME, Priority.LOW, False, FrontierMode.REALTIME, "job"),
    ("realtime", None, FrontierMode.AUTO, Priority.LOW, False, FrontierMode.BATCH, "job:auto:low_priority"),
    ("realtime", None, FrontierMode.AUTO, Priority.NORMAL, False, FrontierMode.REALTIME,
     "job:auto:normal_priority"),
    ("realtime", FrontierMode.AUTO, None, Priority.HIGH, True, FrontierMode.BATCH, "tenant:auto:shadow"),
    ("auto", None, None, Priority.LOW, False, FrontierMode.BATCH, "task:auto:low_priority"),
    ("auto", None, None, Priority.HIGH, False, FrontierMode.REALTIME, "task:auto:high_priority"),
])
def test_the_frontier_mode_is_the_most_specific_level_that_sets_one(
        task_mode: str, tenant_mode: FrontierMode | None, job_mode: FrontierMode | None, priority: Priority,
        shadow: bool, mode: FrontierMode, source: str) -> None:
    # given
    request = RouteRequest(task=task_with_mode(task_mode), input_chars=100, priority=priority,
                           job_frontier_mode=job_mode, tenant_frontier_mode=tenant_mode, shadow=shadow)

    # when
    decision = decide_route(request)

    # then: the decision is stored with the route, which level made it too
    assert decide_frontier_mode(request) == (mode, source)
    assert (decision.frontier_mode, decision.frontier_mode_source) == (mode, source)
    assert decision.tier is Tier.FRONTIER


@pytest.mark.parametrize(("mode", "source", "shadow_mode"), [
    (FrontierMode.REALTIME, "default", FrontierMode.REALTIME),
    (FrontierMode.REALTIME, "job", FrontierMode.REALTIME),
    (FrontierMode.BATCH, "tenant", FrontierMode.BATCH),
    (FrontierMode.REALTIME, "task:auto:normal_priority", FrontierMode.BATCH),
    (FrontierMode.REALTIME, "tenant:auto:high_priority", FrontierMode.BATCH),
    (FrontierMode.BATCH, "job:auto:low_priority", FrontierMode.BATCH),
])
def test_a_shadow_sample_is_batched_when_the_level_that_decided_said_auto_or_batch(
        mode: FrontierMode, source: str, shadow_mode: FrontierMode) -> None:
    # given: a job's stored route; when / then
    route = RouteDecision(tier=Tier.SMALL, reason=RouteReason.TASK_DEFAULT, frontier_mode=mode,
                          frontier_mode_source=source)
    assert shadow_frontier_mode(route) is shadow_mode

"""The autoscalers watch exactly the Redis lists the Celery configuration fills.

Celery on Redis with priorities keeps one list per queue and priority step; a trigger on a list
nobody fills never scales, and a list without a trigger hides its backlog. Both the chart and the
kustomize manifests are read against the code's constants, so neither can drift from them.
"""

from __future__ import annotations

import re

import pytest

from smallfirst.common import constants
from tests.deploy.manifests import OVERLAYS, Manifest, chart_values, container, find, of_kind

DEPLOYED_POOLS = (constants.POOL_SMALL, constants.POOL_FRONTIER, constants.POOL_WEBHOOKS)
_IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")


def expected_lists(pool: str) -> list[str]:
    """The Redis keys of every queue the pool consumes, every priority step and the fair backlog of a
    fair queue, in the code's order."""
    return [key for queue in constants.POOL_QUEUES[pool] for key in constants.queue_backlog_keys(queue)]


def _formula_terms(formula: str) -> list[str]:
    return [term.strip() for term in formula.split("+")]


def test_expected_lists_include_the_priority_lists() -> None:
    # given / when
    keys = expected_lists(constants.POOL_SMALL)

    # then: the separator is the raw control characters kombu uses, not their escaped spelling
    assert keys[0] == constants.QUEUE_SMALL
    assert keys[1] == f"{constants.QUEUE_SMALL}\x06\x16{constants.PRIORITY_STEPS[1]}"
    assert len(keys) == len(constants.PRIORITY_STEPS) + 1
    # and the backlog waiting in the tenants' fair lists for the queue's dispatcher
    assert keys[-1] == constants.fair_backlog_key(constants.QUEUE_SMALL)


@pytest.mark.parametrize("pool", DEPLOYED_POOLS)
def test_chart_triggers_name_exactly_the_pools_redis_lists(pool: str) -> None:
    # given
    spec = chart_values()["workers"]["pools"][pool]

    # when
    keys = [entry["key"] for entry in spec["redisLists"]]
    names = [entry["name"] for entry in spec["redisLists"]]

    # then
    assert keys == expected_lists(pool)
    assert spec["queues"] == list(constants.POOL_QUEUES[pool])
    assert len(set(names)) == len(names)
    assert all(_IDENTIFIER.match(name) for name in names), names


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("pool", DEPLOYED_POOLS)
def test_kustomize_triggers_name_exactly_the_pools_redis_lists(
    rendered_overlays: dict[str, list[Manifest]], overlay: str, pool: str
) -> None:
    # given
    objects = rendered_overlays[overlay]
    scaled = find(objects, "ScaledObject", f"smallfirst-{pool}-worker")
    triggers = scaled["spec"]["triggers"]

    # when
    keys = [t["metadata"]["listName"] for t in triggers]
    names = [t["name"] for t in triggers]
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    target = find(objects, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])

    # then
    assert keys == expected_lists(pool)
    assert {t["type"] for t in triggers} == {"redis"}
    assert sorted(_formula_terms(formula)) == sorted(names), "the formula must add up every list once"
    assert container(target, "worker")["livenessProbe"]["exec"]["command"][3] == pool


@pytest.mark.parametrize("pool", DEPLOYED_POOLS)
def test_chart_and_kustomize_scale_a_pool_alike(rendered_overlays: dict[str, list[Manifest]], pool: str) -> None:
    # given
    chart = chart_values()["workers"]["pools"][pool]
    scaled = find(rendered_overlays["cpu"], "ScaledObject", f"smallfirst-{pool}-worker")

    # when
    kustomize_names = [t["name"] for t in scaled["spec"]["triggers"]]
    per_replica = {t["metadata"]["listLength"] for t in scaled["spec"]["triggers"]}

    # then
    assert kustomize_names == [entry["name"] for entry in chart["redisLists"]]
    assert per_replica == {str(chart["autoscaling"]["messagesPerReplica"])}
    assert scaled["spec"]["advanced"]["scalingModifiers"]["target"] == str(chart["autoscaling"]["messagesPerReplica"])
    assert scaled["spec"]["minReplicaCount"] == chart["autoscaling"]["minReplicas"]
    assert scaled["spec"]["maxReplicaCount"] == chart["autoscaling"]["maxReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_queue_has_an_autoscaled_consumer(rendered_overlays: dict[str, list[Manifest]], overlay: str) -> None:
    # given
    scaled_objects = of_kind(rendered_overlays[overlay], "ScaledObject")

    # when
    watched = {t["metadata"]["listName"] for s in scaled_objects for t in s["spec"]["triggers"]}

    # then
    for queue in constants.ALL_QUEUES:
        assert set(constants.queue_backlog_keys(queue)) <= watched, f"no autoscaler watches queue {queue!r}"


def test_kustomize_triggers_reach_redis_by_its_full_dns_name(rendered_overlays: dict[str, list[Manifest]]) -> None:
    # given: KEDA's operator resolves names from its own namespace
    objects = rendered_overlays["cpu"]
    redis = find(objects, "Service", "smallfirst-redis")

    # when
    addresses = {t["metadata"]["address"] for s in of_kind(objects, "ScaledObject") for t in s["spec"]["triggers"]}

    # then
    assert addresses == {f"smallfirst-redis.{redis['metadata']['namespace']}.svc.cluster.local:6379"}

"""Every SMALLFIRST_* variable the deployment sets is one a service's settings class reads.

pydantic-settings ignores unknown variables (extra="ignore"), so a misspelt or renamed variable in a
manifest would silently fall back to the default. The names are read from the settings classes.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from smallfirst.api.settings import ApiSettings
from smallfirst.common import constants
from smallfirst.common.delivery import WebhookWorkerSettings
from smallfirst.common.settings import CoreSettings
from smallfirst.frontier_sim.settings import FrontierSimSettings
from smallfirst.frontier_worker.settings import FrontierWorkerSettings
from smallfirst.inference.settings import InferenceSettings
from smallfirst.small_worker.worker import SmallWorkerSettings
from tests.deploy.manifests import CHART_DIR, COMPOSE_FILE, OVERLAYS, Manifest, chart_values, load_yaml, of_kind

SETTINGS: tuple[type[BaseSettings], ...] = (
    CoreSettings, ApiSettings, SmallWorkerSettings, FrontierWorkerSettings, WebhookWorkerSettings, InferenceSettings,
    FrontierSimSettings,
)
_TEMPLATE_ENV_NAME = re.compile(r"- name: (SMALLFIRST_[A-Z0-9_]+)")


def env_names(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads (upper case; pydantic-settings ignores case)."""
    prefix = str(settings.model_config.get("env_prefix", ""))
    names = set()
    for field_name, field in settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {str(choice).upper() for choice in alias.choices}
        elif isinstance(alias, str):
            names.add(alias.upper())
        else:
            names.add(f"{prefix}{field_name}".upper())
    return names


KNOWN = set().union(*(env_names(s) for s in SETTINGS))


def _unknown(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("SMALLFIRST_") and n.upper() not in KNOWN}


def _container_env(objects: list[Manifest]) -> set[str]:
    names = set()
    for workload in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet"):
        spec = workload["spec"]["template"]["spec"]
        for c in spec["containers"] + spec.get("initContainers", []):
            names |= {item["name"] for item in c.get("env", [])}
    for config_map in of_kind(objects, "ConfigMap"):
        if config_map["metadata"]["name"].startswith("smallfirst-env"):
            names |= set(config_map["data"])
    return names


def test_the_reader_finds_the_settings_variables() -> None:
    # when
    names = env_names(CoreSettings)

    # then
    assert {"SMALLFIRST_REDIS_URL", "REDIS_URL", "SMALLFIRST_CATALOG_PATH", "SMALLFIRST_TASK_TIME_LIMIT_S"} <= names
    assert "SMALLFIRST_INFERENCE_SERVED_MODEL_NAME" in env_names(InferenceSettings)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_sets_only_variables_the_services_read(
    rendered_overlays: dict[str, list[Manifest]], overlay: str
) -> None:
    # when
    names = _container_env(rendered_overlays[overlay])

    # then
    assert _unknown(names) == set()
    assert {"SMALLFIRST_TASK_TIME_LIMIT_S", "SMALLFIRST_INFERENCE_SERVED_MODEL_NAME"} <= names


def test_compose_sets_only_variables_the_services_read() -> None:
    # given
    compose: dict[str, Any] = load_yaml(COMPOSE_FILE)

    # when
    names = {name for service in compose["services"].values() for name in service.get("environment", {})}

    # then
    assert _unknown(names) == set()


def test_chart_templates_set_only_variables_the_services_read() -> None:
    # given
    text = "".join(p.read_text(encoding="utf-8") for p in (CHART_DIR / "templates").iterdir())

    # when
    names = set(_TEMPLATE_ENV_NAME.findall(text))
    names |= {name for pool in chart_values()["workers"]["pools"].values() for name in pool["env"]}
    names |= {name for model in chart_values()["inference"]["models"].values() for name in model["env"]}

    # then
    assert len(names) > 5
    assert _unknown(names) == set()


def test_metrics_ports_are_the_services_defaults(rendered_overlays: dict[str, list[Manifest]]) -> None:
    # given: the workers take their metrics port from the code, so the manifests must agree with it
    expected = {"small": constants.DEFAULT_METRICS_PORT_SMALL_WORKER,
                "frontier": constants.DEFAULT_METRICS_PORT_FRONTIER_WORKER,
                "webhooks": constants.DEFAULT_METRICS_PORT_WEBHOOK_WORKER}
    pools = chart_values()["workers"]["pools"]

    # when
    kustomize_ports = {}
    for pool in expected:
        deployment = next(d for d in of_kind(rendered_overlays["cpu"], "Deployment")
                          if d["metadata"]["name"] == f"smallfirst-{pool}-worker")
        kustomize_ports[pool] = deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]

    # then
    assert {pool: pools[pool]["metricsPort"] for pool in expected} == expected
    assert kustomize_ports == expected
    assert chart_values()["inference"]["metricsPort"] == constants.DEFAULT_METRICS_PORT_INFERENCE
    assert chart_values()["inference"]["grpcPort"] == constants.DEFAULT_INFERENCE_PORT
    assert chart_values()["api"]["port"] == constants.DEFAULT_API_PORT

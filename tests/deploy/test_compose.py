"""docker-compose.yml against the compose specification, and the stack's wiring.

There is no Docker engine here; the file is checked against the compose specification's JSON schema
(as shipped in the check-jsonschema package) and its services against each other.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from typing import Any

import jsonschema
import pytest

from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.settings import CoreSettings
from tests.deploy.manifests import COMPOSE_DIR, COMPOSE_FILE, DASHBOARD_FILE, REPO_ROOT, load_yaml


@pytest.fixture(scope="module")
def compose_schema() -> dict[str, Any]:
    text = (importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = load_yaml(COMPOSE_FILE)
    return document


def _errors(schema: dict[str, Any], document: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in jsonschema.Draft202012Validator(schema).iter_errors(document)]


def _duration_s(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a compose duration: {text}"
    assert parts, f"not a compose duration: {text}"
    return sum(float(n) * units[u] for n, u in parts)


def test_compose_file_follows_the_compose_specification(compose_schema: dict[str, Any],
                                                        compose: dict[str, Any]) -> None:
    # when
    errors = _errors(compose_schema, compose)

    # then
    assert not errors, "\n".join(errors)


def test_schema_check_refuses_a_misspelt_service_key(compose_schema: dict[str, Any],
                                                     compose: dict[str, Any]) -> None:
    # given
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["stop_grace_periode"] = "10s"

    # when
    errors = _errors(compose_schema, broken)

    # then
    assert errors


def test_redis_keeps_every_write_and_never_evicts(compose: dict[str, Any]) -> None:
    # given
    command = compose["services"]["redis"]["command"]

    # when
    options = dict(zip(command[1::2], command[2::2], strict=True))

    # then
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"


@pytest.mark.parametrize("service", ["small-worker", "frontier-worker", "webhooks-worker"])
def test_worker_stop_grace_period_covers_the_longest_task_and_soft_shutdown(compose: dict[str, Any],
                                                                             service: str) -> None:
    # given
    spec = compose["services"][service]
    env = spec["environment"]

    # when
    grace_s = _duration_s(spec["stop_grace_period"])

    # then
    assert grace_s > int(env["SMALLFIRST_TASK_TIME_LIMIT_S"]) + float(env["SMALLFIRST_WORKER_SOFT_SHUTDOWN_TIMEOUT_S"])


def test_every_smallfirst_image_is_built_from_a_dockerfile_in_the_repo(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        if not spec.get("image", "").startswith("smallfirst-"):
            continue
        # then
        assert spec["build"]["context"] == ".", name
        assert (REPO_ROOT / spec["build"]["dockerfile"]).is_file(), name


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, spec in compose["services"].items():
        for volume in spec.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                # then
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"


def test_workers_reach_every_small_model_of_the_catalog(compose: dict[str, Any]) -> None:
    # given
    env = compose["x-smallfirst-env"]
    settings = CoreSettings.model_validate({"redis_url": env["SMALLFIRST_REDIS_URL"],
                                            "catalog_path": default_catalog_path()})
    services = compose["services"]

    # when
    targets: dict[str, str] = json.loads(env["SMALLFIRST_INFERENCE_TARGETS"])
    models = {task.small.model for task in load_catalog(settings.catalog_path).tasks()}

    # then
    assert env["SMALLFIRST_CATALOG_PATH"] == "/opt/smallfirst/catalog"
    assert models <= set(targets)
    for model, target in targets.items():
        host = target.removeprefix("dns:///").partition(":")[0]
        assert host in services, f"{model}: no service {host}"
        assert services[host]["environment"]["SMALLFIRST_INFERENCE_SERVED_MODEL_NAME"] == model


def test_frontier_worker_uses_the_simulator_unless_a_key_is_given(compose: dict[str, Any]) -> None:
    # given
    worker = compose["services"]["frontier-worker"]
    simulator = compose["services"]["frontier-sim"]

    # when
    sim_host, _, sim_port = worker["environment"]["SMALLFIRST_FRONTIER_SIM_URL"].removeprefix("http://").partition(":")

    # then: the worker picks the simulator itself when ANTHROPIC_API_KEY is empty
    assert worker["environment"]["ANTHROPIC_API_KEY"] == "${ANTHROPIC_API_KEY:-}"
    assert "SMALLFIRST_FRONTIER_BASE_URL" not in worker["environment"]
    assert sim_host == "frontier-sim"
    assert simulator["ports"] == [f"127.0.0.1:{sim_port}:{sim_port}"]
    assert "command" not in worker, "the image's CMD (smallfirst worker --pool frontier) runs under tini"


def test_gpu_profile_reserves_a_gpu_and_takes_the_generators_name(compose: dict[str, Any]) -> None:
    # given
    gpu = compose["services"]["inference-generate-gpu"]

    # when
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]

    # then
    assert gpu["profiles"] == ["gpu"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert "inference-generate" in gpu["networks"]["default"]["aliases"]
    assert gpu["build"]["dockerfile"] == "services/inference/Dockerfile.gpu"
    assert "profiles" not in compose["services"]["inference-generate"]


def test_tiny_model_is_made_before_the_generator_starts(compose: dict[str, Any]) -> None:
    # given
    services = compose["services"]

    # then
    assert "smallfirst make-tiny-model /models/tiny" in " ".join(services["tiny-model"]["command"])
    for name in ("inference-generate", "inference-generate-gpu"):
        assert services[name]["depends_on"]["tiny-model"]["condition"] == "service_completed_successfully"
        assert "/models/tiny" in services[name]["command"]
        assert services[name]["environment"]["SMALLFIRST_INFERENCE_LOAD_FORMAT"] == "dummy"


def test_collector_pipelines_use_defined_components(compose: dict[str, Any]) -> None:
    # given
    config = load_yaml(COMPOSE_DIR / "otel-collector.yaml")

    # when
    pipelines = config["service"]["pipelines"]

    # then
    for pipeline in pipelines.values():
        for section in ("receivers", "processors", "exporters"):
            assert set(pipeline.get(section, [])) <= set(config[section]), section
    assert config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0] in compose["services"]
    assert compose["x-smallfirst-env"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_prometheus_scrapes_each_service_on_its_metrics_port(compose: dict[str, Any]) -> None:
    # given
    config = load_yaml(COMPOSE_DIR / "prometheus.yml")
    expected = {"api": 8000, "small-worker": 9101, "frontier-worker": 9102, "webhooks-worker": 9104,
                "inference-embed": 9103, "inference-generate": 9103}

    # when
    scraped = {name: sd["port"] for job in config["scrape_configs"] for sd in job.get("dns_sd_configs", [])
               for name in sd["names"]}

    # then
    assert scraped == expected
    assert set(scraped) <= set(compose["services"])
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./helm/smallfirst/files/alerts.yaml:/etc/prometheus/rules/smallfirst-alerts.yaml:ro" in mounts


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    # given
    datasources = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "datasources.yaml")
    providers = load_yaml(COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "dashboards.yaml")
    dashboard = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))

    # when
    uids = {d["uid"] for d in datasources["datasources"]}
    used = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}

    # then
    assert used <= uids
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


@pytest.mark.parametrize("service", ["api", "small-worker", "frontier-worker", "webhooks-worker", "inference-embed",
                                     "inference-generate", "redis"])
def test_a_process_that_exits_non_zero_is_started_again(compose: dict[str, Any], service: str) -> None:
    # A worker whose consumer fails for good exits non-zero (worker_app.bound_exit_on_failure) and an
    # inference server whose engine dies does too: compose must start them again. Compose does not
    # restart a container that is merely unhealthy, so the exit is what brings a worker back here.
    assert compose["services"][service].get("restart") in {"always", "unless-stopped", "on-failure"}

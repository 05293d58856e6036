"""The kustomize overlays render, every object is valid, and the workloads are wired as the code expects."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.settings import CoreSettings
from tests.deploy.crd_schemas import CUSTOM_RESOURCE_SCHEMAS
from tests.deploy.manifests import (
    ALERTS_FILE,
    KUSTOMIZE_DIR,
    OVERLAYS,
    Manifest,
    container,
    env_of,
    find,
    load_yaml,
    of_kind,
    pod_spec,
)

# The oldest Kubernetes the manifests support (gRPC probes are GA from 1.27) and the newest
# kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
WORKER_POOLS = ("small", "frontier", "webhooks")
SMALLFIRST_WORKLOADS = (
    "smallfirst-api", "smallfirst-small-worker", "smallfirst-frontier-worker", "smallfirst-webhooks-worker",
    "smallfirst-inference-embed", "smallfirst-inference-generate", "smallfirst-frontier-sim",
)


def _validation_errors(objects: list[Manifest], version: str) -> list[str]:
    errors = []
    for obj in objects:
        ident = f"{obj['kind']}/{obj['metadata']['name']}"
        custom_schema = CUSTOM_RESOURCE_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
        try:
            if custom_schema is not None:
                jsonschema.Draft202012Validator(custom_schema).validate(obj)
            else:
                kubernetes_validate.validate(obj, version, strict=True)
        except jsonschema.ValidationError as exc:
            path = ".".join(str(p) for p in exc.absolute_path)
            errors.append(f"{ident}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{ident}: no schema for {obj['apiVersion']} {obj['kind']} (add it to crd_schemas.py)")
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_against_its_schema(
    rendered_overlays: dict[str, list[Manifest]], overlay: str, version: str
) -> None:
    # given
    objects = rendered_overlays[overlay]

    # when
    errors = _validation_errors(objects, version)

    # then
    assert not errors, "\n".join(errors)


def test_schema_check_refuses_a_broken_object(rendered_overlays: dict[str, list[Manifest]]) -> None:
    # given: a Deployment with a misspelt field and a ScaledObject with a numeric trigger setting
    deployment = yaml.safe_load(yaml.safe_dump(find(rendered_overlays["cpu"], "Deployment", "smallfirst-api")))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    scaled = yaml.safe_load(yaml.safe_dump(find(rendered_overlays["cpu"], "ScaledObject", "smallfirst-small-worker")))
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 20

    # when
    errors = _validation_errors([deployment, scaled], KUBERNETES_VERSIONS[-1])

    # then
    assert len(errors) == 2, errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_deploys_every_component_in_one_namespace(
    rendered_overlays: dict[str, list[Manifest]], overlay: str
) -> None:
    # given
    objects = rendered_overlays[overlay]

    # when
    deployments = {o["metadata"]["name"] for o in of_kind(objects, "Deployment")}
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}

    # then
    assert deployments == set(SMALLFIRST_WORKLOADS)
    assert namespaces == {"smallfirst"}
    find(objects, "StatefulSet", "smallfirst-redis")
    for name in ("smallfirst-inference-embed-headless", "smallfirst-inference-generate-headless"):
        assert find(objects, "Service", name)["spec"]["clusterIP"] == "None"
    pdbs = {o["metadata"]["name"] for o in of_kind(objects, "PodDisruptionBudget")}
    assert pdbs == set(SMALLFIRST_WORKLOADS) - {"smallfirst-frontier-sim"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_grace_period_covers_the_longest_task_and_soft_shutdown(
    rendered_overlays: dict[str, list[Manifest]], overlay: str
) -> None:
    for pool in WORKER_POOLS:
        # given
        deployment = find(rendered_overlays[overlay], "Deployment", f"smallfirst-{pool}-worker")
        env = env_of(container(deployment, "worker"))

        # when
        needed_s = int(env["SMALLFIRST_TASK_TIME_LIMIT_S"]) + float(env["SMALLFIRST_WORKER_SOFT_SHUTDOWN_TIMEOUT_S"])

        # then
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > needed_s
        assert int(env["SMALLFIRST_BROKER_VISIBILITY_TIMEOUT_S"]) > int(env["SMALLFIRST_TASK_TIME_LIMIT_S"])
        assert "replicas" not in deployment["spec"], "the ScaledObject owns a pool's replicas"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_run_their_pool_and_probe_its_heartbeat(
    rendered_overlays: dict[str, list[Manifest]], overlay: str
) -> None:
    for pool in WORKER_POOLS:
        # given
        worker = container(find(rendered_overlays[overlay], "Deployment", f"smallfirst-{pool}-worker"), "worker")

        # when
        command_line = " ".join(worker.get("command", []) + worker["args"])
        probe = worker["livenessProbe"]["exec"]["command"]

        # then
        assert f"smallfirst worker --pool {pool}" in command_line
        assert probe[:4] == ["smallfirst", "worker-probe", "--pool", pool]
        assert "--max-age-s" in probe


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_non_root_on_a_read_only_root_filesystem(
    rendered_overlays: dict[str, list[Manifest]], overlay: str
) -> None:
    objects = rendered_overlays[overlay]
    for workload in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet"):
        # given
        spec = pod_spec(workload)
        mounts_by_container = {c["name"]: {m["mountPath"] for m in c.get("volumeMounts", [])}
                               for c in spec["containers"] + spec.get("initContainers", [])}

        # then
        assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
        for c in spec["containers"] + spec.get("initContainers", []):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        if workload["kind"] == "Deployment":
            assert all("/tmp" in mounts for mounts in mounts_by_container.values()), workload["metadata"]["name"]


def test_gpu_overlay_puts_the_generator_on_a_gpu_node(rendered_overlays: dict[str, list[Manifest]]) -> None:
    # given
    generate = find(rendered_overlays["gpu"], "Deployment", "smallfirst-inference-generate")
    cpu_generate = find(rendered_overlays["cpu"], "Deployment", "smallfirst-inference-generate")

    # when
    inference = container(generate, "inference")
    tolerations = pod_spec(generate).get("tolerations", [])

    # then
    assert inference["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert inference["image"].startswith("smallfirst-inference-gpu:")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert pod_spec(generate)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "VLLM_CPU_KVCACHE_SPACE" not in env_of(inference)
    assert "nvidia.com/gpu" not in container(cpu_generate, "inference")["resources"].get("limits", {})
    assert container(cpu_generate, "inference")["image"].startswith("smallfirst-inference-cpu:")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_uses_grpc_health_probes(rendered_overlays: dict[str, list[Manifest]], overlay: str) -> None:
    for model in ("embed", "generate"):
        # given
        inference = container(find(rendered_overlays[overlay], "Deployment", f"smallfirst-inference-{model}"),
                              "inference")

        # then
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert inference[probe]["grpc"]["port"] == 50051, (model, probe)


def test_prometheus_rule_is_the_alerts_file(rendered_overlays: dict[str, list[Manifest]]) -> None:
    # given
    rule = find(rendered_overlays["cpu"], "PrometheusRule", "smallfirst")

    # when
    alerts = load_yaml(ALERTS_FILE)

    # then
    assert rule["spec"] == alerts, "deploy/k8s/base/monitoring.yaml differs from helm/smallfirst/files/alerts.yaml"


def test_catalog_copies_are_the_images_default_catalog() -> None:
    # given
    packaged = {p.name: p.read_text(encoding="utf-8") for p in default_catalog_path().glob("*.yaml")}

    # when
    copies = {p.name: p.read_text(encoding="utf-8") for p in (KUSTOMIZE_DIR / "base" / "catalog").glob("*.yaml")}

    # then
    assert copies == packaged, f"copy {default_catalog_path()}/*.yaml to deploy/k8s/base/catalog/"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_catalog_configmap_loads_and_every_small_model_has_an_inference_service(
    rendered_overlays: dict[str, list[Manifest]], overlay: str, tmp_path: Path
) -> None:
    # given: the catalog as the pods see it, mounted from the generated ConfigMap
    objects = rendered_overlays[overlay]
    config_maps = of_kind(objects, "ConfigMap")
    catalog_map = next(o for o in config_maps if o["metadata"]["name"].startswith("smallfirst-catalog"))
    for name, text in catalog_map["data"].items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    env_map = next(o for o in config_maps if o["metadata"]["name"].startswith("smallfirst-env"))
    settings = CoreSettings.model_validate({"redis_url": env_map["data"]["SMALLFIRST_REDIS_URL"],
                                           "catalog_path": tmp_path})

    # when
    catalog = load_catalog(settings.catalog_path)
    inference_targets: dict[str, str] = yaml.safe_load(env_map["data"]["SMALLFIRST_INFERENCE_TARGETS"])
    headless = {o["metadata"]["name"]: o for o in of_kind(objects, "Service") if o["spec"].get("clusterIP") == "None"}

    # then
    assert {task.small.model for task in catalog.tasks()} <= set(inference_targets)
    for model, target in inference_targets.items():
        host, _, port = target.removeprefix("dns:///").partition(":")
        assert host in headless, f"{model}: no headless Service {host}"
        assert int(port) in {p["port"] for p in headless[host]["spec"]["ports"]}
        served = {env_of(container(d, "inference")).get("SMALLFIRST_INFERENCE_SERVED_MODEL_NAME")
                  for d in of_kind(objects, "Deployment") if d["metadata"]["name"] == host.removesuffix("-headless")}
        assert served == {model}

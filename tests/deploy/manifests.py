"""Reading the deployment files the way their consumers do: kustomize, PyYAML, the chart's values."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "helm" / "smallfirst"
KUSTOMIZE_DIR = REPO_ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
ALERTS_FILE = CHART_DIR / "files" / "alerts.yaml"
METRICS_DOC = REPO_ROOT / "deploy" / "METRICS.md"
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
COMPOSE_DIR = REPO_ROOT / "deploy" / "compose"
DASHBOARD_FILE = COMPOSE_DIR / "grafana" / "dashboards" / "smallfirst.json"

Manifest = dict[str, Any]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def render_overlay(kubectl: str, overlay: str) -> list[Manifest]:
    """`kubectl kustomize` of one overlay, parsed: the objects `kubectl apply -k` would send."""
    result = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE_DIR / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    return [o for o in objects if o["kind"] == kind]


def pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Manifest, name: str) -> Manifest:
    matches = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    assert len(matches) == 1, f"{workload['metadata']['name']} has no single container {name!r}"
    return matches[0]


def env_of(container_spec: Manifest) -> dict[str, Any]:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container_spec.get("env", [])}


def chart_values() -> Manifest:
    values: Manifest = load_yaml(CHART_DIR / "values.yaml")
    return values


_METRIC_ROW = re.compile(r"^\| `(smallfirst_[a-z0-9_]+)` \|", re.MULTILINE)


def contract_metrics() -> set[str]:
    """Metric names listed in deploy/METRICS.md."""
    return set(_METRIC_ROW.findall(METRICS_DOC.read_text(encoding="utf-8")))


_SMALLFIRST_NAME = re.compile(r"\b(smallfirst_[a-z0-9_]+)")
# A histogram is listed once; queries use its series.
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names_in(expr: str) -> set[str]:
    names = set()
    for name in _SMALLFIRST_NAME.findall(expr):
        for suffix in _HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names

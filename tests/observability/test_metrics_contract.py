"""The metrics the deployment files depend on (deploy/METRICS.md, the dashboard, the alert rules) are
the ones the services export, with the label values the queries select on."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from smallfirst.common.jobs import JobStatus, Tier
from smallfirst.common.metrics import (
    PHASE_QUEUE_WAIT,
    PHASE_RUN,
    PHASE_SUBMIT_TO_RESULT,
    FrontierMetrics,
    JobMetrics,
    QueueCollector,
)
from smallfirst.inference.metrics import InferenceMetrics
from tests.deploy.manifests import contract_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]
QUERY_FILES = (
    REPO_ROOT / "deploy" / "compose" / "grafana" / "dashboards" / "smallfirst.json",
    REPO_ROOT / "helm" / "smallfirst" / "files" / "alerts.yaml",
    REPO_ROOT / "deploy" / "k8s" / "base" / "monitoring.yaml",
)


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    JobMetrics(registry)
    FrontierMetrics(registry)
    InferenceMetrics("m", registry)
    families = [*registry.collect(), *QueueCollector("redis://127.0.0.1:1/0").describe()]
    return {f.name + "_total" if f.type == "counter" else f.name for f in families}


def label_values_in_queries(label: str) -> set[str]:
    # Matches phase="x" in YAML and phase=\"x\" inside the dashboard's JSON strings.
    pattern = re.compile(label + r'=\\?"([^"\\]+)\\?"')
    return {value for path in QUERY_FILES if path.exists() for value in pattern.findall(path.read_text())}


def test_every_contract_metric_is_exported() -> None:
    # given the metrics deploy/METRICS.md promises to the dashboard and alerts
    contract = contract_metrics()

    # when the metrics the code creates are listed
    exported = exported_metric_names()

    # then none is missing
    assert contract - exported == set()


def test_label_values_the_queries_select_on_are_ones_the_services_export() -> None:
    # given the label values used by the dashboard and the alert rules
    phases = label_values_in_queries("phase")
    tiers = label_values_in_queries("tier")
    statuses = label_values_in_queries("status")

    # then each is a value the services actually put on their samples
    assert phases - {PHASE_QUEUE_WAIT, PHASE_RUN, PHASE_SUBMIT_TO_RESULT} == set()
    assert tiers - {t.value for t in Tier} == set()
    assert statuses - {s.value for s in JobStatus if s.terminal} == set()

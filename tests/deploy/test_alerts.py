"""Alert rules, the dashboard and the metrics contract, checked with Prometheus' own promtool."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.manifests import (
    ALERTS_FILE,
    COMPOSE_DIR,
    DASHBOARD_FILE,
    contract_metrics,
    load_yaml,
    metric_names_in,
)

ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")


def _promtool(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, check=False)


def _dashboard_exprs() -> list[str]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    return [rule["expr"] for group in load_yaml(ALERTS_FILE)["groups"] for rule in group["rules"]]


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    # when
    result = _promtool(promtool, "check", "rules", str(ALERTS_FILE))

    # then
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_their_conditions_and_only_then(promtool: str) -> None:
    # when: the unit tests in alerts_test.yaml feed series and expect (or rule out) each alert
    result = _promtool(promtool, "test", "rules", str(ALERT_TESTS))

    # then
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_tests_can_fail(promtool: str, tmp_path: Path) -> None:
    # given: the worker-down case with a worker up, but still expecting the alert
    tests = load_yaml(ALERT_TESTS)
    case = tests["tests"][1]
    case["alert_rule_test"][0]["exp_alerts"] = tests["tests"][0]["alert_rule_test"][0]["exp_alerts"]
    tests["tests"] = [case]
    tests["rule_files"] = [str(ALERTS_FILE)]
    broken = tmp_path / "broken_test.yaml"
    broken.write_text(yaml.safe_dump(tests), encoding="utf-8")

    # when
    result = _promtool(promtool, "test", "rules", str(broken))

    # then
    assert result.returncode != 0, result.stdout


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    # given: Grafana's range variables replaced by durations, each query a recording rule
    exprs = [e.replace("$__rate_interval", "5m").replace("$__range", "1h") for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"smallfirst:dashboard_query_{i}", "expr": expr} for i, expr in enumerate(exprs)]}]}
    rules_file = tmp_path / "dashboard_rules.yaml"
    rules_file.write_text(yaml.safe_dump(rules), encoding="utf-8")

    # when
    result = _promtool(promtool, "check", "rules", str(rules_file))

    # then
    assert len(exprs) >= 10
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_and_alerts_use_only_contract_metrics() -> None:
    # given
    contract = contract_metrics()

    # when
    used = set().union(*(metric_names_in(e) for e in _dashboard_exprs() + _alert_exprs()))

    # then
    assert used - contract == set(), f"not in deploy/METRICS.md: {sorted(used - contract)}"
    assert contract >= CORE_METRICS


# What the dashboard and the autoscaling notes are built on; the contract may list more.
CORE_METRICS = {
    "smallfirst_queue_length", "smallfirst_unacked_messages", "smallfirst_jobs_submitted_total",
    "smallfirst_jobs_ended_total", "smallfirst_escalations_total", "smallfirst_job_duration_seconds",
    "smallfirst_frontier_cost_usd_total", "smallfirst_savings_usd_total",
    "smallfirst_dead_letters_added_total", "smallfirst_dead_letters_replayed_total",
}


def test_dashboard_covers_queues_latency_escalations_cost_and_savings() -> None:
    # given
    used = set().union(*(metric_names_in(e) for e in _dashboard_exprs()))

    # then
    assert CORE_METRICS <= used <= contract_metrics()


def test_compose_prometheus_config_passes_promtool_check(promtool: str) -> None:
    # when
    result = _promtool(promtool, "check", "config", str(COMPOSE_DIR / "prometheus.yml"))

    # then
    assert result.returncode == 0, result.stdout + result.stderr

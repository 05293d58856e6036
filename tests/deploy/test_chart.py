"""The Helm chart, checked without a helm binary: values against the schema, templates against values.

There is no helm here to render the templates. What can be checked offline is: values.yaml against
values.schema.json (helm install does the same), the schema refusing what it should, every
`.Values.x.y` a template reads existing in values.yaml, balanced template blocks, and the chart's
defaults agreeing with the code (reliability timings, served models, the catalog).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.settings import CoreSettings
from tests.deploy.manifests import CHART_DIR, chart_values, load_yaml

TEMPLATES = sorted((CHART_DIR / "templates").glob("*.yaml")) + sorted((CHART_DIR / "templates").glob("*.tpl"))


@pytest.fixture(scope="module")
def values_schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _errors(schema: dict[str, Any], values: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


def test_default_values_satisfy_the_schema(values_schema: dict[str, Any]) -> None:
    # given
    values = chart_values()

    # when
    errors = _errors(values_schema, values)

    # then
    assert not errors, "\n".join(errors)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(values: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = values
        for key in parents:
            node = node[key]
        node[leaf] = value
    return change


@pytest.mark.parametrize(("change", "why"), [
    (_set("autoscalling", {}), "a misspelt top-level key"),
    (_set("autoscaling.mode", "kedaa"), "an unknown autoscaling mode"),
    (_set("containerSecurityContext.readOnlyRootFilesystem", False), "a writable root filesystem"),
    (_set("podSecurityContext.runAsNonRoot", False), "a root container"),
    (_set("workers.reliability.taskTimeLimitS", "1800"), "a number given as a string"),
    (_set("workers.pools.small.redisLists", [{"name": "small_p0"}]), "a trigger without its Redis list"),
    (_set("workers.pools.small.redisLists", [{"name": "small-p0", "key": "small"}]),
     "a trigger name the scaling formula cannot use"),
    (_set("frontierSim.mode", "on"), "an unknown simulator mode"),
    (_set("catalog.files", {"tasks.json": "tasks: []"}), "a catalog file that is not YAML"),
    (_set("inference.models.embed.modelPath", "models/x"), "a relative model path"),
])
def test_schema_refuses_bad_values(values_schema: dict[str, Any], change: Callable[[dict[str, Any]], None],
                                   why: str) -> None:
    # given
    values = copy.deepcopy(chart_values())

    # when
    change(values)

    # then
    assert _errors(values_schema, values), f"the schema accepted {why}"


_VALUES_PATH = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def _template_value_paths() -> set[tuple[str, ...]]:
    paths = set()
    for template in TEMPLATES:
        for match in _VALUES_PATH.finditer(template.read_text(encoding="utf-8")):
            paths.add(tuple(match.group(1).lstrip(".").split(".")))
    return paths


def test_every_value_a_template_reads_exists_in_values_yaml() -> None:
    # given
    values = chart_values()
    paths = _template_value_paths()

    # when
    missing = []
    for path in sorted(paths):
        node: Any = values
        for key in path:
            if not isinstance(node, dict) or key not in node:
                missing.append(".".join(path))
                break
            node = node[key]

    # then
    assert len(paths) > 50, "the template scan found too few .Values references"
    assert not missing, f"templates read values that values.yaml does not define: {missing}"


_ACTION = re.compile(r"\{\{-?\s*(/\*.*?\*/|[^}]*?)\s*-?\}\}", re.DOTALL)
_OPENERS = ("if ", "range ", "with ", "define ", "block ")


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_blocks_are_balanced(template: Path) -> None:
    # given
    text = template.read_text(encoding="utf-8")

    # when
    depth = 0
    for match in _ACTION.finditer(text):
        action = match.group(1).strip()
        if action.startswith("/*"):
            continue
        if action.startswith(_OPENERS):
            depth += 1
        elif action == "end":
            depth -= 1
            assert depth >= 0, f"{template.name}: 'end' without an open block near offset {match.start()}"

    # then
    assert depth == 0, f"{template.name}: {depth} block(s) left open"
    assert text.count("{{") == text.count("}}"), f"{template.name}: unbalanced braces"


def test_worker_grace_period_is_derived_from_the_reliability_settings() -> None:
    # given
    reliability = chart_values()["workers"]["reliability"]
    helpers = (CHART_DIR / "templates" / "_helpers.tpl").read_text(encoding="utf-8")
    workers = (CHART_DIR / "templates" / "workers.yaml").read_text(encoding="utf-8")

    # when
    grace_s = reliability["taskTimeLimitS"] + reliability["softShutdownTimeoutS"] + reliability["terminationMarginS"]

    # then
    assert grace_s >= reliability["taskTimeLimitS"] + reliability["softShutdownTimeoutS"]
    assert reliability["brokerVisibilityTimeoutS"] > reliability["taskTimeLimitS"]
    assert "add (int $r.taskTimeLimitS) (int $r.softShutdownTimeoutS) (int $r.terminationMarginS)" in helpers
    assert "terminationGracePeriodSeconds: {{ $graceS }}" in workers


def test_reliability_defaults_match_the_code() -> None:
    # given: the chart passes these to the workers; its defaults should be the code's
    reliability = chart_values()["workers"]["reliability"]

    # when
    defaults = CoreSettings.model_fields

    # then
    assert reliability["taskTimeLimitS"] == defaults["task_time_limit_s"].default
    assert reliability["softShutdownTimeoutS"] == defaults["worker_soft_shutdown_timeout_s"].default
    assert reliability["brokerVisibilityTimeoutS"] == defaults["broker_visibility_timeout_s"].default


def test_chart_catalog_is_the_images_default_catalog_and_loads() -> None:
    # given
    chart_catalog = CHART_DIR / "files" / "catalog"
    packaged = {p.name: p.read_text(encoding="utf-8") for p in default_catalog_path().glob("*.yaml")}

    # when
    copies = {p.name: p.read_text(encoding="utf-8") for p in chart_catalog.glob("*.yaml")}
    catalog = load_catalog(chart_catalog)

    # then
    assert copies == packaged, f"copy {default_catalog_path()}/*.yaml to {chart_catalog}/"
    assert len(catalog) > 0


def test_every_small_model_of_the_catalog_is_served_by_the_chart() -> None:
    # given
    values = chart_values()
    catalog = load_catalog(CHART_DIR / "files" / "catalog")

    # when
    served = {m["servedModelName"] for m in values["inference"]["models"].values() if m["enabled"]}
    served |= set(values["inference"]["extraTargets"])

    # then
    assert {task.small.model for task in catalog.tasks()} <= served


def test_prometheus_rule_embeds_the_alerts_file_untemplated() -> None:
    # given
    template = (CHART_DIR / "templates" / "prometheusrule.yaml").read_text(encoding="utf-8")

    # when
    alerts = load_yaml(CHART_DIR / "files" / "alerts.yaml")

    # then: .Files.Get returns the file as text, so Prometheus' own {{ $labels }} stay intact
    assert '.Files.Get "files/alerts.yaml"' in template
    assert "tpl" not in template
    assert {rule["alert"] for group in alerts["groups"] for rule in group["rules"]} >= {
        "SmallfirstBacklogOld", "SmallfirstBacklogLarge", "SmallfirstJobFailureRateHigh",
        "SmallfirstEscalationRateHigh", "SmallfirstFrontierErrors", "SmallfirstSmallWorkersDown",
        "SmallfirstFrontierWorkersDown",
    }


def test_chart_metadata_is_complete() -> None:
    # given
    chart = load_yaml(CHART_DIR / "Chart.yaml")

    # then
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "smallfirst" == CHART_DIR.name
    assert re.match(r"^\d+\.\d+\.\d+$", chart["version"])
    assert chart["appVersion"]

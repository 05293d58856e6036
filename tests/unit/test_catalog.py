from __future__ import annotations

from pathlib import Path

import pytest

from smallfirst.common.catalog import CatalogError, TaskKind, load_catalog


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


BINDINGS = "    small: {model: m}\n    frontier: {model: claude-haiku-5-5}\n"


def test_default_catalog_has_the_example_tasks(catalog) -> None:
    # then
    assert catalog.get("banking77_intent").kind is TaskKind.CLASSIFY
    assert len(catalog.get("banking77_intent").labels) == 77
    assert all(len(label.examples) == 10 for label in catalog.get("banking77_intent").labels)
    assert catalog.get("invoice_fields").kind is TaskKind.EXTRACT
    assert catalog.get("email_summary").kind is TaskKind.GENERATE


def test_kind_defaults_fill_model_bindings(catalog) -> None:
    # then: defaults.small.classify gives the embedding model, defaults.small.extract the generator
    assert catalog.get("banking77_intent").small.model == "all-minilm-l6-v2"
    assert catalog.get("invoice_fields").small.model == "tiny-generator"
    assert catalog.get("email_summary").frontier.model == "claude-sonnet-5-5"


def test_error_names_file_task_and_field(tmp_path: Path) -> None:
    # given: a classify task whose label list is a string
    path = write(tmp_path, "tasks:\n  - name: t1\n    kind: classify\n    labels: nope\n" + BINDINGS)
    # when / then
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    message = str(info.value)
    assert str(path) in message
    assert "'t1'" in message
    assert "labels" in message


def test_extract_task_without_schema_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t2\n    kind: extract\n" + BINDINGS)
    with pytest.raises(CatalogError, match="needs a JSON schema"):
        load_catalog(path)


def test_invalid_json_schema_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t3\n    kind: extract\n    schema: {type: 12}\n" + BINDINGS)
    with pytest.raises(CatalogError, match="not a valid JSON schema"):
        load_catalog(path)


def test_template_with_unknown_field_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t4\n    kind: generate\n    prompt: {user: '{body}'}\n" + BINDINGS)
    with pytest.raises(CatalogError, match="unknown field"):
        load_catalog(path)


def test_unknown_validator_type_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t5\n    kind: generate\n    validators: [{type: vibes}]\n" + BINDINGS)
    with pytest.raises(CatalogError, match="validators"):
        load_catalog(path)


def test_duplicate_task_across_files_is_refused(tmp_path: Path) -> None:
    body = "tasks:\n  - name: same\n    kind: generate\n" + BINDINGS
    (tmp_path / "a.yaml").write_text(body)
    (tmp_path / "b.yaml").write_text(body)
    with pytest.raises(CatalogError, match="already defined"):
        load_catalog(tmp_path)


def test_missing_catalog_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "nope.yaml")


LABELS = "    labels: [{name: a}, {name: b}, {name: none_of_these}]\n"


def test_learning_policy_is_read_with_its_defaults(tmp_path: Path) -> None:
    # given: a classify task that learns towards a target accuracy, with an out-of-scope label
    path = write(tmp_path, "tasks:\n  - name: t9\n    kind: classify\n" + LABELS
                 + "    learning: {enabled: true, target_accuracy: 0.97, shadow_rate: 0.05,\n"
                   "               out_of_scope_label: none_of_these, max_examples_per_label: 50}\n" + BINDINGS)
    # when
    task = load_catalog(path).get("t9")
    # then: the given fields are kept and the rest default
    assert task is not None
    assert task.learns
    assert task.learning.target_accuracy == 0.97
    assert task.learning.shadow_rate == 0.05
    assert task.learning.out_of_scope_label == "none_of_these"
    assert task.learning.max_examples_per_label == 50
    assert task.learning.retention_days == 90.0
    assert task.learning.keep_local_only is False


def test_a_task_without_a_learning_section_does_not_learn(catalog) -> None:
    # then: learning is opt-in per task
    assert not catalog.get("invoice_fields").learns


def test_out_of_scope_label_must_be_a_label_of_the_task(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t10\n    kind: classify\n" + LABELS
                 + "    learning: {enabled: true, out_of_scope_label: other}\n" + BINDINGS)
    with pytest.raises(CatalogError, match="out_of_scope_label"):
        load_catalog(path)


def test_learning_is_refused_on_a_generate_task(tmp_path: Path) -> None:
    path = write(tmp_path, "tasks:\n  - name: t11\n    kind: generate\n    learning: {enabled: true}\n" + BINDINGS)
    with pytest.raises(CatalogError, match="only classify tasks learn"):
        load_catalog(path)


@pytest.mark.parametrize("field", ["target_accuracy: 1.5", "shadow_rate: -0.1", "max_examples_per_label: 0"])
def test_out_of_range_learning_settings_are_refused(tmp_path: Path, field: str) -> None:
    path = write(tmp_path, "tasks:\n  - name: t12\n    kind: classify\n" + LABELS
                 + f"    learning: {{enabled: true, {field}}}\n" + BINDINGS)
    with pytest.raises(CatalogError, match="learning"):
        load_catalog(path)

"""Validators that judge an answer before it becomes a job's result.

A failed small-tier verdict escalates the job; a failed frontier verdict is retried, then fails
the job. Reasons are short codes followed by a message a person understands.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from smallfirst.common.catalog import (
    ChoiceValidator,
    GroundedValidator,
    JsonSchemaValidator,
    MaxLengthValidator,
    MinConfidenceValidator,
    NonEmptyValidator,
    RegexValidator,
    Task,
    TaskKind,
    ValidatorSpec,
)
from smallfirst.common.jobs import Tier, Verdict


def _as_text(answer: Any) -> str:
    if isinstance(answer, str):
        return answer
    return json.dumps(answer, ensure_ascii=False, sort_keys=True)


def _fold(text: str) -> str:
    return " ".join(text.casefold().split())


def _string_values(value: Any, path: str, ignore: tuple[str, ...]) -> list[tuple[str, str]]:
    if isinstance(value, str):
        return [(path, value)]
    if isinstance(value, dict):
        found: list[tuple[str, str]] = []
        for key, item in value.items():
            if key in ignore:
                continue
            found.extend(_string_values(item, f"{path}.{key}" if path else key, ignore))
        return found
    if isinstance(value, list):
        return [pair for i, item in enumerate(value) for pair in _string_values(item, f"{path}[{i}]", ignore)]
    return []


def _label_of(answer: Any) -> Any:
    return answer.get("label") if isinstance(answer, dict) else answer


def check(spec: ValidatorSpec, task: Task, answer: Any, confidence: float | None,
          job_input: dict[str, str]) -> list[str]:
    """Reasons `answer` fails `spec`; empty when it passes."""
    if isinstance(spec, JsonSchemaValidator):
        schema = spec.json_schema or task.answer_schema()
        if isinstance(answer, str):
            return [f"json_schema: the answer is not JSON ({answer[:80]!r})"]
        validator = jsonschema.Draft202012Validator(schema or {})
        errors = sorted(validator.iter_errors(answer), key=lambda e: list(e.absolute_path))
        return [f"json_schema: {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors[:5]]
    if isinstance(spec, ChoiceValidator):
        choices = spec.choices or task.label_names
        label = _label_of(answer)
        if label not in choices:
            return [f"choice: {str(label)[:80]!r} is not one of the {len(choices)} allowed choices"]
        return []
    if isinstance(spec, RegexValidator):
        if spec.field is not None:
            value = answer.get(spec.field) if isinstance(answer, dict) else None
            if not isinstance(value, str):
                return [f"regex: field {spec.field!r} is missing or not text"]
        else:
            value = _as_text(answer)
        if re.fullmatch(spec.pattern, value) is None:
            where = f"field {spec.field!r}" if spec.field else "the answer"
            return [f"regex: {where} does not match {spec.pattern!r}"]
        return []
    if isinstance(spec, MaxLengthValidator):
        length = len(_as_text(answer))
        return [f"max_length: {length} characters, at most {spec.max_chars} allowed"] if length > spec.max_chars else []
    if isinstance(spec, NonEmptyValidator):
        empty = answer is None or (isinstance(answer, str | list | dict) and not (
            answer.strip() if isinstance(answer, str) else answer))
        return ["non_empty: the answer is empty"] if empty else []
    if isinstance(spec, GroundedValidator):
        if not isinstance(answer, dict | list):
            return ["grounded: the answer is not structured data"]
        source = _fold(" ".join(job_input.values()))
        return [
            f"grounded: {path} = {value[:60]!r} does not occur in the input"
            for path, value in _string_values(answer, "", spec.ignore_fields)
            if value.strip() and _fold(value) not in source
        ][:5]
    if isinstance(spec, MinConfidenceValidator):
        if confidence is None:
            return ["min_confidence: the answer carries no confidence"]
        if confidence < spec.threshold:
            return [f"min_confidence: confidence {confidence:.3f} is below {spec.threshold:.3f}"]
        return []
    raise TypeError(f"unknown validator {spec!r}")


def implicit_validators(task: Task) -> tuple[ValidatorSpec, ...]:
    """Checks every answer of a kind gets, whatever the catalog lists: a label for classify,
    schema-valid JSON for extract, some text for generate."""
    if task.kind is TaskKind.CLASSIFY:
        return (ChoiceValidator(),)
    if task.kind is TaskKind.EXTRACT:
        return (JsonSchemaValidator(),)
    return (NonEmptyValidator(),)


@dataclass(frozen=True)
class LearnedGate:
    """What a task's trained head says about its own answer: the calibrated threshold its confidence
    must reach, and how unlike the training examples the input is (escalate above the floor)."""

    version: int
    threshold: float
    novelty: float
    novelty_floor: float


def check_gate(gate: LearnedGate, confidence: float | None) -> list[str]:
    reasons = []
    if confidence is None or confidence < gate.threshold:
        reasons.append(f"learned_threshold: confidence {confidence or 0.0:.3f} is below the calibrated "
                       f"{gate.threshold:.3f} of head v{gate.version}")
    if gate.novelty > gate.novelty_floor:
        reasons.append(f"novelty: {gate.novelty:.3f} from the nearest training example, above the floor "
                       f"{gate.novelty_floor:.3f} of head v{gate.version}")
    return reasons


def validate(task: Task, answer: Any, confidence: float | None, job_input: dict[str, str], *,
             tier: Tier = Tier.SMALL, gate: LearnedGate | None = None) -> Verdict:
    """The verdict on `answer`. With a `gate` (the answer came from a task's trained head), the
    head's calibrated threshold and novelty floor take the place of `min_confidence`, whose
    threshold was set for the seed scorer's scale."""
    reasons: list[str] = []
    seen: set[str] = set()
    if gate is not None and tier is Tier.SMALL:
        reasons.extend(check_gate(gate, confidence))
    for spec in (*implicit_validators(task), *task.validators):
        if isinstance(spec, MinConfidenceValidator) and gate is not None:
            continue
        if isinstance(spec, MinConfidenceValidator) and tier is Tier.FRONTIER:
            # A confidence threshold decides whether to escalate; the frontier tier is where
            # escalations end, and its answers carry no comparable score.
            continue
        key = spec.model_dump_json()
        if key in seen:
            continue
        seen.add(key)
        reasons.extend(check(spec, task, answer, confidence, job_input))
        if reasons and spec.type in {"json_schema", "choice"} and isinstance(answer, str):
            break  # later checks on an answer that is not even structured only repeat the problem
    return Verdict(passed=not reasons, reasons=reasons)

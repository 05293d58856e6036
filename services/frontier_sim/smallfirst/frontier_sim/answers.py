"""What the simulator answers: a fixed or scripted answer, an echo, or an oracle's label.

For a request constrained by a JSON schema (native structured output or a forced tool) without an
authored answer, the simulator synthesizes one that satisfies the schema, grounded in the input
where it can (a field's value is taken from "field name: value" in the user text, a patterned
string is searched for in the text), so grounded-extraction validators have something real to check.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smallfirst.common.errors import ConfigurationError
from smallfirst.frontier_sim.protocol import SimRequest
from smallfirst.frontier_sim.settings import AnswerStrategy

# A fallback string is cut to this many characters.
SYNTH_STRING_MAX_CHARS = 80
_WS = re.compile(r"\s+")
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_DATE = re.compile(r"\b\d{4}-\d{2}-\d{2}\b")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+")


class AnswerSourceError(ConfigurationError, ValueError):
    """A script or labels file could not be loaded; the message names the file and the entry."""


@dataclass(frozen=True)
class Answer:
    # A string for text requests; a JSON value for schema-constrained ones.
    value: Any
    source: str
    # Served verbatim even to a schema-constrained request (an authored answer that is not JSON).
    verbatim: bool = False


# ---- Scripted answers -------------------------------------------------------------------------
class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    match: str
    answer: Any
    # Serve this rule at most this often (then it stops matching); unlimited without.
    times: int | None = Field(default=None, ge=1)


class _ScriptFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[_Rule] = Field(default_factory=list)
    sequence: list[Any] = Field(default_factory=list)
    cycle: bool = False


class Script:
    """Answers authored in a YAML/JSON file.

    ```yaml
    rules:              # first rule whose regex is found in the prompt (system + messages) wins
      - match: "(?i)refund"
        answer: {"label": "refund_request"}   # a mapping/list: a structured answer; a string: text
    sequence:           # for prompts no rule matched, served in order
      - "first answer"
      - {"label": "card_arrival"}
    cycle: false        # start the sequence over when it is used up (else fall back to echo)
    ```
    """

    def __init__(self, rules: list[tuple[re.Pattern[str], Any, int | None]], sequence: list[Any],
                 cycle: bool) -> None:
        self._rules = rules
        self._served = [0] * len(rules)
        self._sequence = sequence
        self._cycle = cycle
        self._position = 0

    @classmethod
    def load(cls, path: Path) -> Script:
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
            parsed = _ScriptFile.model_validate(document)
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise AnswerSourceError(f"{path}: not a valid answer script: {exc}") from exc
        rules = []
        for index, rule in enumerate(parsed.rules):
            try:
                rules.append((re.compile(rule.match), rule.answer, rule.times))
            except re.error as exc:
                raise AnswerSourceError(f"{path}: rules.{index}.match: bad regex: {exc}") from exc
        return cls(rules, parsed.sequence, parsed.cycle)

    def next(self, prompt: str) -> tuple[bool, Any]:
        for index, (pattern, answer, times) in enumerate(self._rules):
            if (times is None or self._served[index] < times) and pattern.search(prompt):
                self._served[index] += 1
                return True, answer
        if self._position < len(self._sequence):
            answer = self._sequence[self._position]
            self._position += 1
            if self._cycle and self._position == len(self._sequence):
                self._position = 0
            return True, answer
        return False, None


# ---- Oracle -----------------------------------------------------------------------------------
def _normalize(text: str) -> str:
    return _WS.sub(" ", text).strip().casefold()


class Oracle:
    """Knows the label of every text in a labels file (e.g. a benchmark's test split)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self._labels = labels
        # Longest first, so that a text that contains a shorter known text is matched as itself.
        self._by_length = sorted(labels, key=len, reverse=True)

    def __len__(self) -> int:
        return len(self._labels)

    @classmethod
    def load(cls, path: Path) -> Oracle:
        try:
            with path.open(newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                fields = [f.strip().lower() for f in reader.fieldnames or []]
                if "text" not in fields or not ({"label", "category"} & set(fields)):
                    raise AnswerSourceError(
                        f"{path}: the header must name a 'text' column and a 'label' (or 'category') column"
                    )
                names = dict(zip(fields, reader.fieldnames or [], strict=True))
                label_column = names.get("label") or names["category"]
                labels: dict[str, str] = {}
                for row in reader:
                    text, label = row.get(names["text"]), row.get(label_column)
                    if text and label:
                        labels[_normalize(text)] = label.strip()
        except OSError as exc:
            raise AnswerSourceError(f"{path}: cannot read the labels file: {exc}") from exc
        if not labels:
            raise AnswerSourceError(f"{path}: no labelled rows")
        return cls(labels)

    def lookup(self, prompt: str) -> str | None:
        whole = _normalize(prompt)
        if whole in self._labels:
            return self._labels[whole]
        for line in prompt.splitlines():
            label = self._labels.get(_normalize(line).strip("\"'"))
            if label is not None:
                return label
        for known in self._by_length:
            if known in whole:
                return self._labels[known]
        return None


# ---- Schema-valid synthesis -------------------------------------------------------------------
def synthesize(schema: dict[str, Any], text: str, label: str | None = None) -> Any:
    """A value satisfying `schema`, taken from `text` where possible; `label` wins any enum it is in."""
    return _value(schema, "", text, label, depth=0)


def _value(schema: Any, name: str, text: str, label: str | None, depth: int) -> Any:
    if not isinstance(schema, dict) or depth > 8:
        return _grounded_string(name, text, {})
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return label if label in schema["enum"] else schema["enum"][0]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            non_null = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
            return _value((non_null or options)[0], name, text, label, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        return {key: _value(sub, key, text, label, depth + 1) for key, sub in properties.items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 1)), 0)
        if "maxItems" in schema:
            count = min(count, int(schema["maxItems"]))
        return [_value(schema.get("items", {}), name, text, label, depth + 1) for _ in range(count)]
    if kind in ("number", "integer"):
        return _grounded_number(name, text, schema, integer=kind == "integer")
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _grounded_string(name, text, schema)


def _field_value(name: str, text: str) -> str | None:
    """The value after "Field Name:" (or "field_name =") in the text, if the text labels it."""
    words = [w for w in re.split(r"[_\-\s]+|(?<=[a-z])(?=[A-Z])", name) if w]
    if not words:
        return None
    label = r"[\s_\-]*".join(re.escape(w) for w in words)
    match = re.search(rf"(?i)\b{label}\b\s*(?:[:=#]|is)\s*(?P<value>[^\n;]+)", text)
    if match is None:
        return None
    return match.group("value").strip().rstrip(".,").strip() or None


def _grounded_string(name: str, text: str, schema: dict[str, Any]) -> str:
    candidate = _field_value(name, text) if name else None
    fmt = schema.get("format")
    if fmt == "date":
        found = _DATE.search(candidate or "") or _DATE.search(text)
        candidate = found.group(0) if found else "2026-01-01"
    elif fmt == "email":
        found = _EMAIL.search(candidate or "") or _EMAIL.search(text)
        candidate = found.group(0) if found else "someone@example.com"
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            unanchored = re.compile(pattern.removeprefix("^").removesuffix("$"))
            found = unanchored.search(candidate or "") or unanchored.search(text)
            if found:
                candidate = found.group(0)
        except re.error:
            pass  # a pattern Python cannot compile: keep the best other candidate
    if candidate is None:
        first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
        candidate = first_line[:SYNTH_STRING_MAX_CHARS].strip()
    max_length = schema.get("maxLength")
    if isinstance(max_length, int):
        candidate = candidate[:max_length]
    min_length = schema.get("minLength")
    if isinstance(min_length, int) and len(candidate) < min_length:
        candidate = (candidate + " " + text)[:min_length].ljust(min_length, ".")
    return candidate


def _grounded_number(name: str, text: str, schema: dict[str, Any], integer: bool) -> int | float:
    source = _field_value(name, text) if name else None
    found = _NUMBER.search(source or "") or (None if source else _NUMBER.search(text))
    value: float = 0.0
    if found:
        raw = found.group(0)
        # "1,234.50" -> 1234.50; "12,5" -> 12.5
        raw = raw.replace(",", "") if "." in raw else raw.replace(",", ".")
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
    if isinstance(schema.get("minimum"), int | float):
        value = max(value, float(schema["minimum"]))
    if isinstance(schema.get("maximum"), int | float):
        value = min(value, float(schema["maximum"]))
    return round(value) if integer else value


# ---- The responder ----------------------------------------------------------------------------
class Responder:
    def __init__(self, strategy: AnswerStrategy, fixed_answer: str | None = None, script: Script | None = None,
                 oracle: Oracle | None = None) -> None:
        self.strategy = strategy
        self._fixed_answer = fixed_answer
        self._script = script
        self._oracle = oracle
        self.misses = 0  # scripted/oracle requests answered by the echo/synthesis fallback

    def answer(self, request: SimRequest) -> Answer:
        schema = request.forced_tool.input_schema if request.forced_tool else request.output_schema
        authored, source, label = self._authored(request)
        if schema is None:
            if label is not None:
                return Answer(label, source)
            if authored is not None:
                return Answer(authored if isinstance(authored, str) else json.dumps(authored), source)
            return Answer(request.last_user_text, "echo")
        if authored is not None:
            # Authored answers are served as written, even invalid ones: tests script bad answers.
            value, verbatim = _as_json(authored)
            return Answer(value, source, verbatim)
        value = synthesize(schema, request.user_text, label)
        if label is None:
            source = "synthesized"
        elif not _mentions(value, label):
            self.misses += 1  # the schema had no enum holding the oracle's label
        return Answer(value, source)

    def _authored(self, request: SimRequest) -> tuple[Any, str, str | None]:
        """(authored answer or None, its source, oracle label or None)."""
        if self.strategy is AnswerStrategy.FIXED:
            return self._fixed_answer, "fixed", None
        if self.strategy is AnswerStrategy.SCRIPTED and self._script is not None:
            found, answer = self._script.next(request.prompt_text)
            if found:
                return answer, "scripted", None
            self.misses += 1
        if self.strategy is AnswerStrategy.ORACLE and self._oracle is not None:
            label = self._oracle.lookup(request.user_text)
            if label is not None:
                return None, "oracle", label
            self.misses += 1
        return None, "echo", None


def _as_json(answer: Any) -> tuple[Any, bool]:
    """(JSON value, False), or (the text, True) for an authored string that is not JSON."""
    if isinstance(answer, str):
        try:
            return json.loads(answer), False
        except json.JSONDecodeError:
            return answer, True
    return answer, False


def _mentions(value: Any, label: str) -> bool:
    if value == label:
        return True
    if isinstance(value, dict):
        return any(_mentions(v, label) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, label) for v in value)
    return False

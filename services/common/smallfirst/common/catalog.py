"""The task catalog: the tasks an operator lets tenants run, validated at start-up.

A catalog is a YAML file, or a folder of YAML files merged in name order. Errors name the file,
the task and the field, so an operator can fix a catalog without reading code.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smallfirst.common.errors import ConfigurationError
from smallfirst.common.jobs import FrontierMode, Tier


class CatalogError(ConfigurationError, ValueError):
    """The catalog could not be loaded; the message names the file, the task and the field."""


class TaskKind(StrEnum):
    CLASSIFY = "classify"
    EXTRACT = "extract"
    GENERATE = "generate"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Label(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    examples: tuple[str, ...] = ()


class PromptTemplates(_Strict):
    """str.format templates over the job's input fields (and, for escalations, {small_answer})."""

    system: str = ""
    user: str = "{text}"


# ---- Validators -------------------------------------------------------------------------------
class JsonSchemaValidator(_Strict):
    type: Literal["json_schema"] = "json_schema"
    # Without a schema of its own it judges against the task's schema.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")


class ChoiceValidator(_Strict):
    type: Literal["choice"] = "choice"
    # Without choices of its own it judges against the task's labels.
    choices: tuple[str, ...] = ()


class RegexValidator(_Strict):
    type: Literal["regex"] = "regex"
    pattern: str
    # For extract tasks: the field to match; without it, the whole answer as text.
    field: str | None = None


class MaxLengthValidator(_Strict):
    type: Literal["max_length"] = "max_length"
    max_chars: int = Field(gt=0)


class NonEmptyValidator(_Strict):
    type: Literal["non_empty"] = "non_empty"


class GroundedValidator(_Strict):
    """Every string value of an extracted object occurs in the input (case and spaces folded)."""

    type: Literal["grounded"] = "grounded"
    ignore_fields: tuple[str, ...] = ()


class MinConfidenceValidator(_Strict):
    type: Literal["min_confidence"] = "min_confidence"
    threshold: float = Field(ge=0.0, le=1.0)


ValidatorSpec = Annotated[
    JsonSchemaValidator
    | ChoiceValidator
    | RegexValidator
    | MaxLengthValidator
    | NonEmptyValidator
    | GroundedValidator
    | MinConfidenceValidator,
    Field(discriminator="type"),
]


# ---- Routing and model bindings ----------------------------------------------------------------
class SmallUnavailablePolicy(StrEnum):
    """What a job does while the small tier's inference service is down."""

    ESCALATE = "escalate"  # hand it to the frontier at once: fast, but the frontier bills it
    WAIT = "wait"  # retry with a backoff until the job's deadline, then escalate (or fail, local-only)


class RoutingPolicy(_Strict):
    default_tier: Tier = Tier.SMALL
    # Sensitive tasks never leave the self-hosted tier.
    local_only: bool = False
    small_unavailable: SmallUnavailablePolicy = SmallUnavailablePolicy.ESCALATE
    # How frontier attempts are sent unless the tenant or the job says otherwise.
    frontier_mode: FrontierMode = FrontierMode.REALTIME


class SmallBinding(_Strict):
    """The self-hosted model of a task: an embedding model for classify, a generator otherwise."""

    model: str
    max_tokens: int = Field(default=256, gt=0)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    timeout_s: float = Field(default=30.0, gt=0)
    # The small model's context in tokens; longer inputs are routed to the frontier tier.
    max_context_tokens: int = Field(default=512, gt=0)


class LearningPolicy(_Strict):
    """How a classify task learns from the frontier's answers (see smallfirst.common.examples and the
    small worker's trainer). Off unless `enabled`; a job or a tenant may still opt out."""

    enabled: bool = False
    # The accuracy the answers the small tier keeps must reach, judged by a lower confidence bound
    # (Clopper-Pearson) on held-out predictions; None: the trained head gates at `default_threshold`.
    target_accuracy: float | None = Field(default=None, gt=0.5, lt=1.0)
    # The one-sided confidence of that lower bound.
    confidence_level: float = Field(default=0.9, ge=0.5, lt=1.0)
    # The gate of a trained head without a target accuracy.
    default_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    # Share of kept small-tier answers also answered by the frontier in the background (shadow check).
    shadow_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    # The label meaning "none of these": the frontier may answer it and the head learns it.
    out_of_scope_label: str | None = None
    # Examples kept per label (oldest dropped first) and for how long.
    max_examples_per_label: int = Field(default=500, gt=0, le=100_000)
    retention_days: float = Field(default=90.0, gt=0)
    # Whether inputs of local-only jobs (reaching the memory by feedback only) may be kept as examples.
    keep_local_only: bool = False
    # A new head is trained once this many examples arrived since the last training.
    retrain_every: int = Field(default=100, gt=0)
    # The fewest learned (non-seed) examples before a trained head may replace the seed scorer.
    min_examples: int = Field(default=50, ge=0)


class StructuredOutputMode(StrEnum):
    AUTO = "auto"  # native structured outputs where the model supports them, else a forced tool
    NATIVE = "native"
    TOOL = "tool"


class FrontierBinding(_Strict):
    model: str
    max_tokens: int = Field(default=1024, gt=0)
    # No temperature: the Messages API of the SDK in use (anthropic 2.12) takes none.
    structured_output: StructuredOutputMode = StructuredOutputMode.AUTO
    # How often a frontier answer that fails validation is asked again before the job fails.
    max_validation_retries: int = Field(default=1, ge=0, le=5)
    timeout_s: float = Field(default=120.0, gt=0)


class Task(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_\-]{0,63}$")
    kind: TaskKind
    description: str = ""
    # The fields a job's input must carry, each a string; other fields are refused.
    input_fields: tuple[str, ...] = ("text",)
    max_input_chars: int = Field(default=20_000, gt=0)
    labels: tuple[Label, ...] = ()
    output_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    prompt: PromptTemplates = PromptTemplates()
    validators: tuple[ValidatorSpec, ...] = ()
    routing: RoutingPolicy = RoutingPolicy()
    learning: LearningPolicy = LearningPolicy()
    small: SmallBinding
    frontier: FrontierBinding

    @field_validator("input_fields")
    @classmethod
    def _fields_non_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("a task needs at least one input field")
        return value

    @model_validator(mode="after")
    def _kind_rules(self) -> Task:
        if self.kind is TaskKind.CLASSIFY:
            if len(self.labels) < 2:
                raise ValueError("a classify task needs at least two labels")
            names = [label.name for label in self.labels]
            if len(set(names)) != len(names):
                raise ValueError("label names must be unique")
        elif self.labels:
            raise ValueError(f"labels are only for classify tasks, not {self.kind.value}")
        if self.kind is TaskKind.EXTRACT:
            if self.output_schema is None:
                raise ValueError("an extract task needs a JSON schema ('schema')")
            try:
                jsonschema.Draft202012Validator.check_schema(self.output_schema)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"'schema' is not a valid JSON schema: {exc.message}") from exc
        if self.learning.enabled and self.kind is not TaskKind.CLASSIFY:
            raise ValueError("learning: only classify tasks learn online (others keep their examples for export)")
        oos = self.learning.out_of_scope_label
        if oos is not None and oos not in {label.name for label in self.labels}:
            raise ValueError(f"learning.out_of_scope_label {oos!r} must be one of the task's labels")
        for spec in self.validators:
            if isinstance(spec, JsonSchemaValidator) and spec.json_schema is None and self.output_schema is None:
                raise ValueError("a json_schema validator needs a schema of its own or the task's")
            if isinstance(spec, ChoiceValidator) and not spec.choices and not self.labels:
                raise ValueError("a choice validator needs choices of its own or the task's labels")
        for template in (self.prompt.system, self.prompt.user):
            _check_template(template, set(self.input_fields) | {"small_answer", "labels"})
        return self

    @property
    def learns(self) -> bool:
        """Whether frontier answers of this task become training examples of its head."""
        return self.kind is TaskKind.CLASSIFY and self.learning.enabled

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema an answer must satisfy: the task's schema, or for classify the label enum."""
        if self.kind is TaskKind.CLASSIFY:
            return {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(self.label_names)}},
                "required": ["label"],
                "additionalProperties": False,
            }
        return self.output_schema

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _check_template(template: str, allowed: set[str]) -> None:
    import string

    for _, field_name, _, _ in string.Formatter().parse(template):
        if field_name is None:
            continue
        if field_name not in allowed:
            raise ValueError(f"prompt template names unknown field {{{field_name}}}; known: {sorted(allowed)}")


class Catalog:
    """The loaded, validated tasks, looked up by name."""

    def __init__(self, tasks: dict[str, Task], sources: tuple[Path, ...]) -> None:
        self._tasks = tasks
        self.sources = sources

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def tasks(self) -> list[Task]:
        return [self._tasks[name] for name in sorted(self._tasks)]

    def __len__(self) -> int:
        return len(self._tasks)


def default_catalog_path() -> Path:
    """The example catalog that ships inside the package (Banking77, invoices, email summaries)."""
    return Path(__file__).parent / "default_catalog"


def load_catalog(path: Path | str) -> Catalog:
    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in {".yaml", ".yml"})
        if not files:
            raise CatalogError(f"{root}: no .yaml files in the catalog folder")
    elif root.is_file():
        files = [root]
    else:
        raise CatalogError(f"{root}: catalog file or folder does not exist")
    tasks: dict[str, Task] = {}
    origin: dict[str, Path] = {}
    for file in files:
        for task in _load_file(file):
            if task.name in tasks:
                raise CatalogError(f"{file}: task {task.name!r} is already defined in {origin[task.name]}")
            tasks[task.name] = task
            origin[task.name] = file
    return Catalog(tasks, tuple(files))


def _load_file(file: Path) -> list[Task]:
    try:
        document = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"{file}: not valid YAML: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("tasks"), list):
        raise CatalogError(f"{file}: expected a mapping with a 'tasks' list")
    defaults = document.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CatalogError(f"{file}: 'defaults' must be a mapping")
    tasks = []
    for index, raw in enumerate(document["tasks"]):
        name = raw.get("name", f"#{index}") if isinstance(raw, dict) else f"#{index}"
        if not isinstance(raw, dict):
            raise CatalogError(f"{file}: task {name}: expected a mapping")
        merged = _merge_defaults(defaults, raw)
        try:
            tasks.append(Task.model_validate(merged))
        except ValidationError as exc:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in err['loc']) or '(task)'}: {err['msg']}" for err in exc.errors()
            )
            raise CatalogError(f"{file}: task {name!r}: {problems}") from exc
    return tasks


def _merge_defaults(defaults: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """File-level `defaults` fill the model bindings and routing a task leaves out."""
    merged = dict(raw)
    for section in ("small", "frontier", "routing"):
        base = defaults.get(section)
        if isinstance(base, dict):
            if isinstance(raw.get("kind"), str) and isinstance(base.get(raw["kind"]), dict):
                # Per-kind defaults, e.g. defaults.small.classify.model for the embedding model.
                base = {**{k: v for k, v in base.items() if not isinstance(v, dict)}, **base[raw["kind"]]}
            else:
                base = {k: v for k, v in base.items() if not isinstance(v, dict)}
            merged[section] = {**base, **(raw.get(section) or {})}
    return merged

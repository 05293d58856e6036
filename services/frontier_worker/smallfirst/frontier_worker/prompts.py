"""The request a task's job becomes: prompts from the task's templates, and how its answer is shaped."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

from smallfirst.common.catalog import Task, TaskKind
from smallfirst.common.prompts import labels_text, render_prompt
from smallfirst.frontier_worker.errors import PromptRenderError

ANSWER_TOOL_NAME: Final = "submit_answer"
# A schema that is not an object is wrapped in one under this key for the forced tool (tool inputs
# must be objects) and unwrapped from the answer.
WRAPPED_ANSWER_KEY: Final = "answer"
# For the rate limiter's estimate of input tokens before the call (the API reports the real count).
CHARS_PER_TOKEN_ESTIMATE: Final = 4
# Framing the API adds around system prompt, messages and tools.
TOKEN_OVERHEAD_ESTIMATE: Final = 16


class AnswerShape(StrEnum):
    TEXT = "text"
    NATIVE = "native"  # output_config.format json_schema: a text block holding the JSON answer
    TOOL = "tool"  # a forced tool whose input_schema is the answer's schema


@dataclass(frozen=True)
class EscalationContext:
    """What the small tier answered and why validation rejected it."""

    small_answer: Any
    reasons: Sequence[str] = ()


@dataclass(frozen=True)
class FrontierRequest:
    model: str
    max_tokens: int
    timeout_s: float
    system: str
    user: str
    shape: AnswerShape
    schema: dict[str, Any] | None = None
    # True when the forced tool's schema wraps a non-object answer schema.
    wrapped: bool = False

    def estimated_input_tokens(self) -> int:
        chars = len(self.system) + len(self.user)
        if self.schema is not None:
            chars += len(json.dumps(self.schema))
        return math.ceil(chars / CHARS_PER_TOKEN_ESTIMATE) + TOKEN_OVERHEAD_ESTIMATE

    def create_kwargs(self) -> dict[str, Any]:
        """Arguments of `client.messages.create` for this request."""
        args: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": self.user}],
            "timeout": self.timeout_s,
        }
        if self.system:
            args["system"] = self.system
        if self.shape is AnswerShape.NATIVE:
            args["output_config"] = {"format": {"type": "json_schema", "schema": self.schema}}
        elif self.shape is AnswerShape.TOOL:
            args["tools"] = [{
                "name": ANSWER_TOOL_NAME,
                "description": "Submit the answer. Its input is the complete answer; call it exactly once.",
                "input_schema": self.tool_schema(),
            }]
            args["tool_choice"] = {"type": "tool", "name": ANSWER_TOOL_NAME}
        return args

    def tool_schema(self) -> dict[str, Any]:
        assert self.schema is not None
        if not self.wrapped:
            return self.schema
        return {"type": "object", "properties": {WRAPPED_ANSWER_KEY: self.schema},
                "required": [WRAPPED_ANSWER_KEY], "additionalProperties": False}

    def with_shape(self, shape: AnswerShape) -> FrontierRequest:
        return FrontierRequest(self.model, self.max_tokens, self.timeout_s, self.system,
                               self.user, shape, self.schema,
                               shape is AnswerShape.TOOL and _needs_wrapping(self.schema))


def _needs_wrapping(schema: dict[str, Any] | None) -> bool:
    return schema is not None and schema.get("type") != "object"


def build_request(task: Task, job_input: Mapping[str, str], escalation: EscalationContext | None,
                  shape: AnswerShape) -> FrontierRequest:
    """The frontier request for one job; `shape` is ignored for generate tasks (always text)."""
    system, user = render_prompts(task, job_input, escalation)
    binding = task.frontier
    if task.kind is TaskKind.GENERATE:
        return FrontierRequest(binding.model, binding.max_tokens, binding.timeout_s, system, user,
                               AnswerShape.TEXT)
    schema = task.answer_schema()
    if schema is None:  # the catalog guarantees one for classify and extract
        raise PromptRenderError(f"task {task.name!r} has no answer schema")
    return FrontierRequest(binding.model, binding.max_tokens, binding.timeout_s, system, user, shape, schema,
                           shape is AnswerShape.TOOL and _needs_wrapping(schema))


def render_prompts(task: Task, job_input: Mapping[str, str],
                   escalation: EscalationContext | None) -> tuple[str, str]:
    """System prompt and user content from the task's templates (str.format over the input fields).

    `{labels}` is the task's labels with their descriptions; `{small_answer}` the small tier's
    answer for an escalated job (empty otherwise). An escalated job's user content also ends with
    the small answer (unless the template placed it) and the reasons it was rejected.
    """
    missing = [name for name in task.input_fields if name not in job_input]
    if missing:
        raise PromptRenderError(f"job input lacks field(s) {', '.join(missing)} that task {task.name!r} needs")
    small_answer = escalation.small_answer if escalation is not None else None
    try:
        # The same rendering as the small tier's, so both tiers see the same prompt.
        rendered = render_prompt(task, dict(job_input), small_answer)
    except (KeyError, IndexError, ValueError) as exc:
        raise PromptRenderError(f"task {task.name!r}: prompt template cannot be filled: {exc}") from exc
    system, user = rendered.system, rendered.user
    templates = task.prompt.system + task.prompt.user
    if task.kind is TaskKind.CLASSIFY and "{labels}" not in templates:
        # The schema's enum names the labels; their descriptions are what tells them apart.
        system = f"{system}\n\nAnswer with exactly one of these labels:\n{labels_text(task)}".strip()
    if escalation is not None:
        user = f"{user}\n\n{_escalation_note(escalation, show_answer='{small_answer}' not in templates)}"
    return system, user


def _escalation_note(escalation: EscalationContext, show_answer: bool) -> str:
    lines = ["---", "A smaller model answered this first, and its answer was rejected."]
    if show_answer:
        lines.append(f"Its answer: {_as_text(escalation.small_answer)}")
    if escalation.reasons:
        lines.append("Why it was rejected:")
        lines.extend(f"- {reason}" for reason in escalation.reasons)
    lines.append("Give your own, correct answer.")
    return "\n".join(lines)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)

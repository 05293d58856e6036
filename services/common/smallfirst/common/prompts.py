"""Rendering a task's prompt templates, the same way on both tiers, and estimating frontier usage.

The estimate prices what the frontier tier would have charged for a job the small tier served,
so that savings can be reported without calling the frontier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from smallfirst.common.catalog import Task, TaskKind
from smallfirst.common.jobs import Usage

# Characters per token for English text with Claude-family tokenizers; an estimate, not a count.
CHARS_PER_TOKEN_ESTIMATE = 3.5
# Tokens a structured classify answer takes ({"label": "..."}) plus the message envelope.
CLASSIFY_ANSWER_TOKENS = 12


@dataclass(frozen=True)
class RenderedPrompt:
    system: str
    user: str


def labels_text(task: Task) -> str:
    """The label list as it appears in a {labels} placeholder: one line a label, with its meaning."""
    return "\n".join(
        f"- {label.name}: {label.description}" if label.description else f"- {label.name}" for label in task.labels
    )


def render_prompt(task: Task, job_input: dict[str, str], small_answer: Any = None) -> RenderedPrompt:
    values: dict[str, str] = dict(job_input)
    values["labels"] = labels_text(task)
    values["small_answer"] = "" if small_answer is None else (
        small_answer if isinstance(small_answer, str) else json.dumps(small_answer, ensure_ascii=False))
    return RenderedPrompt(system=task.prompt.system.format_map(values), user=task.prompt.user.format_map(values))


def estimate_frontier_usage(task: Task, job_input: dict[str, str], answer: Any) -> Usage:
    prompt = render_prompt(task, job_input)
    input_tokens = int((len(prompt.system) + len(prompt.user)) / CHARS_PER_TOKEN_ESTIMATE) + 8
    if task.kind is TaskKind.CLASSIFY:
        output_tokens = CLASSIFY_ANSWER_TOKENS
    else:
        text = answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)
        output_tokens = max(8, int(len(text) / CHARS_PER_TOKEN_ESTIMATE))
    if task.kind is TaskKind.EXTRACT and task.output_schema is not None:
        # Structured output sends the schema along (as a tool definition or output format).
        input_tokens += int(len(json.dumps(task.output_schema)) / CHARS_PER_TOKEN_ESTIMATE)
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)

"""Runs one job's task on the small tier and returns the answer; judging it is the caller's business.

Classify, with an embedding model (the usual case): the input is embedded and compared with every
label's texts (description and seed examples, see label_index.py). A label's score is the best
cosine similarity between the input and any of its texts (nearest neighbour). The confidence is
the winning label's probability under a softmax over the label scores at temperature
`classify_temperature`:

    p(label) = exp(score(label) / T) / sum(exp(score(l) / T) for l in labels)

With T = 0.05 (the default), a lead of 0.05 in cosine similarity over the runner-up is worth a
factor e in odds, so the confidence is high only when one label is clearly closer than every
other; two near-equal labels give at most about 0.5. It is what the `min_confidence` validator
judges, and its threshold is the knob that trades accuracy against escalations (bench/small_tier.py
prints accuracy and the share kept by the small tier for a few thresholds on Banking77).

Classify with a generator: `Generate` constrained to the label names; there is no calibrated
confidence (None).

Extract: `Generate` constrained by the task's JSON schema; the answer is the parsed object, or the
raw text when it does not parse (cut off by max_tokens), so that validation fails it with a reason.

Generate: free text, or one of a choice validator's choices when the task names them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import ChoiceValidator, Task, TaskKind
from smallfirst.common.jobs import Usage
from smallfirst.common.prompts import render_prompt
from smallfirst.small_worker.inference_client import Constraint, Generation, InferenceClient, InferenceError
from smallfirst.small_worker.label_index import LabelIndexCache

DEFAULT_CLASSIFY_TEMPERATURE = 0.05


class SmallTierTaskError(InferenceError):
    """The task cannot run on the small tier as configured (wrong model kind, missing input).

    An InferenceError, so the caller handles it like any failed small-tier attempt (escalation).
    """

    code = "small_tier_task_error"


@dataclass(frozen=True)
class SmallAnswer:
    # JSON-compatible: {"label": ...} (classify), the parsed object or the raw text (extract), text.
    answer: Any
    confidence: float | None
    usage: Usage
    model: str
    finish_reason: str  # "stop" or "length"
    latency_ms: float
    # The model's text as generated (None for embedding-based classification).
    raw_text: str | None = None
    # Classify: the best labels with their probabilities, best first.
    alternatives: tuple[tuple[str, float], ...] = ()


class SmallTierExecutor:
    def __init__(
        self,
        client: InferenceClient,
        cache: redis.Redis,
        *,
        classify_temperature: float = DEFAULT_CLASSIFY_TEMPERATURE,
        alternatives: int = 3,
        label_cache_ttl_s: int | None = 30 * 24 * 3600,
    ) -> None:
        if classify_temperature <= 0:
            raise ValueError("classify_temperature must be positive")
        self._client = client
        self._labels = LabelIndexCache(client, cache, ttl_s=label_cache_ttl_s)
        self._temperature = classify_temperature
        self._alternatives = alternatives

    def run(self, task: Task, job_input: dict[str, str]) -> SmallAnswer:
        missing = [name for name in task.input_fields if name not in job_input]
        if missing:
            raise SmallTierTaskError(f"task {task.name}: input lacks field(s) {missing}")
        started = time.perf_counter()
        if task.kind is TaskKind.CLASSIFY:
            if self._client.model_info(task.small.model).kind == "embed":
                answer = self._classify_by_embedding(task, job_input)
            else:
                answer = self._classify_by_generation(task, job_input)
        elif task.kind is TaskKind.EXTRACT:
            answer = self._extract(task, job_input)
        else:
            answer = self._generate(task, job_input)
        return replace(answer, latency_ms=(time.perf_counter() - started) * 1e3)

    # ---- classify ---------------------------------------------------------------------------------
    def _classify_by_embedding(self, task: Task, job_input: dict[str, str]) -> SmallAnswer:
        model = task.small.model
        text = "\n".join(job_input[name] for name in task.input_fields)
        # A classification reads the start of a long message; the rest is cut, not refused.
        with telemetry.gen_ai_span(k.GEN_AI_OPERATION_EMBEDDINGS, k.GEN_AI_PROVIDER_SMALLFIRST, model):
            embedded = self._client.embed(model, [text], truncate=True, timeout_s=task.small.timeout_s)
            telemetry.annotate_gen_ai_response(usage=Usage(input_tokens=embedded.prompt_tokens),
                                               response_model=embedded.model)
        query = embedded.vectors[0]
        index = self._labels.get(model, task.labels, dimensions=int(query.shape[0]))
        probabilities = softmax(index.label_scores(query), self._temperature)
        order = np.argsort(-probabilities)
        best = int(order[0])
        return SmallAnswer(
            answer={"label": index.names[best]},
            confidence=float(probabilities[best]),
            usage=Usage(input_tokens=embedded.prompt_tokens),
            model=embedded.model,
            finish_reason="stop",
            latency_ms=0.0,
            alternatives=tuple((index.names[int(i)], float(probabilities[int(i)]))
                               for i in order[: self._alternatives]),
        )

    def _classify_by_generation(self, task: Task, job_input: dict[str, str]) -> SmallAnswer:
        generation = self._call_generate(task, job_input, Constraint(choices=task.label_names),
                                         max_tokens=choice_max_tokens(task.label_names))
        return _answer(generation, {"label": generation.text}, confidence=None)

    # ---- extract / generate -------------------------------------------------------------------------
    def _extract(self, task: Task, job_input: dict[str, str]) -> SmallAnswer:
        schema = task.answer_schema()
        generation = self._call_generate(task, job_input, Constraint(json_schema=schema) if schema else None,
                                         max_tokens=task.small.max_tokens)
        try:
            answer: Any = json.loads(generation.text)
        except json.JSONDecodeError:
            answer = generation.text
        return _answer(generation, answer, confidence=None)

    def _generate(self, task: Task, job_input: dict[str, str]) -> SmallAnswer:
        choices = next((spec.choices for spec in task.validators if isinstance(spec, ChoiceValidator) and spec.choices),
                       None)
        if choices:
            generation = self._call_generate(task, job_input, Constraint(choices=choices),
                                             max_tokens=choice_max_tokens(choices))
            return _answer(generation, generation.text, confidence=None)
        generation = self._call_generate(task, job_input, None, max_tokens=task.small.max_tokens)
        return _answer(generation, generation.text.strip(), confidence=None)

    def _call_generate(self, task: Task, job_input: dict[str, str], constraint: Constraint | None,
                       max_tokens: int) -> Generation:
        model = task.small.model
        if self._client.model_info(model).kind != "generate":
            raise SmallTierTaskError(f"task {task.name} ({task.kind.value}) needs a generator, "
                                     f"but {model} is an embedding model")
        prompt = render_prompt(task, job_input)
        messages = [("system", prompt.system)] if prompt.system.strip() else []
        messages.append(("user", prompt.user))
        with telemetry.gen_ai_span(k.GEN_AI_OPERATION_CHAT, k.GEN_AI_PROVIDER_SMALLFIRST, model, max_tokens=max_tokens):
            generation = self._client.generate(
                model,
                messages=messages,
                temperature=task.small.temperature,
                max_tokens=max_tokens,
                constraint=constraint,
                timeout_s=task.small.timeout_s,
            )
            telemetry.annotate_gen_ai_response(
                usage=Usage(input_tokens=generation.prompt_tokens, output_tokens=generation.completion_tokens),
                response_model=generation.model, finish_reasons=[generation.finish_reason])
        return generation


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    scaled = (scores.astype(np.float64) - float(scores.max())) / temperature
    weights = np.exp(scaled)
    result: np.ndarray = weights / weights.sum()
    return result


def choice_max_tokens(choices: tuple[str, ...] | list[str]) -> int:
    """Enough tokens for the longest choice plus the end of sequence.

    A token covers at least one byte in byte-level BPE and SentencePiece with byte fallback, so the
    UTF-8 length bounds the count; a choice cut off by max_tokens is no choice at all, and once a
    choice is complete the constraint forces the end, so the bound costs nothing.
    """
    return max(len(choice.encode("utf-8")) for choice in choices) + 1


def _answer(generation: Generation, answer: Any, confidence: float | None) -> SmallAnswer:
    return SmallAnswer(
        answer=answer,
        confidence=confidence,
        usage=Usage(input_tokens=generation.prompt_tokens, output_tokens=generation.completion_tokens),
        model=generation.model,
        finish_reason=generation.finish_reason,
        latency_ms=0.0,
        raw_text=generation.text,
    )

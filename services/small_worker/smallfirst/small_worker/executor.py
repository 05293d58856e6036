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

The input's Embed call is shared with the concurrent jobs of the process (coalescer.py), and the
batch's queries of one task are scored together: `LabelProbabilities` maps a matrix of query
vectors to their label probabilities with one matrix product; a task's live trained head scores in
its place (`HeadScores`: the probabilities and each query's novelty, from the same one call).

Classify with a generator: `Generate` constrained to the label names; there is no calibrated
confidence (None).

Extract: `Generate` constrained by the task's JSON schema; the answer is the parsed object, or the
raw text when it does not parse (cut off by max_tokens), so that validation fails it with a reason.

Generate: free text, or one of a choice validator's choices when the task names them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import redis

from smallfirst.common import constants as k
from smallfirst.common import telemetry
from smallfirst.common.catalog import ChoiceValidator, Task, TaskKind
from smallfirst.common.errors import ConfigurationError, SmallfirstError
from smallfirst.common.jobs import Usage
from smallfirst.common.prompts import render_prompt
from smallfirst.common.validation import LearnedGate
from smallfirst.small_worker.coalescer import EmbedCoalescer
from smallfirst.small_worker.heads import HeadCache, TrainedHead, remember_input_vector
from smallfirst.small_worker.inference_client import Constraint, Generation, InferenceClient, InferenceFailed
from smallfirst.small_worker.label_index import LabelIndex, LabelIndexCache, text_digest

log = logging.getLogger(__name__)

DEFAULT_CLASSIFY_TEMPERATURE = 0.05


class SmallTierTaskError(ConfigurationError):
    """The task cannot run on the small tier as configured (wrong model kind, missing input).

    A catalog mistake: final, so that the job fails loudly instead of paying the frontier for it.
    """

    code = "small_tier_misconfigured"


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
    # Classify by a task's trained head: the head's own gate (replaces min_confidence).
    gate: LearnedGate | None = None


class SmallTierExecutor:
    def __init__(
        self,
        client: InferenceClient,
        cache: redis.Redis,
        *,
        classify_temperature: float = DEFAULT_CLASSIFY_TEMPERATURE,
        alternatives: int = 3,
        label_cache_ttl_s: int | None = 30 * 24 * 3600,
        coalescer: EmbedCoalescer | None = None,
    ) -> None:
        if classify_temperature <= 0:
            raise ValueError("classify_temperature must be positive")
        self._client = client
        self._labels = LabelIndexCache(client, cache, ttl_s=label_cache_ttl_s)
        self._cache = cache
        self._heads = HeadCache(cache)
        self._temperature = classify_temperature
        self._alternatives = alternatives
        # Concurrent jobs' inputs share Embed calls, and their scoring one matrix product (coalescer.py).
        self._coalescer = coalescer or EmbedCoalescer(
            lambda model, texts, timeout_s: client.embed(model, texts, truncate=True, timeout_s=timeout_s))
        self._scorers: dict[int, LabelProbabilities] = {}
        self._head_scorers: dict[int, HeadScores] = {}

    @property
    def label_indexes(self) -> LabelIndexCache:
        return self._labels

    def close(self) -> None:
        self._coalescer.close()

    def warm_label_indexes(self, tasks: Iterable[Task]) -> list[str]:
        """Build the label index of every classify task on an embedding model now (the label texts'
        vectors come from Redis, or from the inference service once); returns the tasks warmed.

        Best effort, for the bootstrap: a task whose index cannot be built now (the inference
        service is not up yet) is logged and built by its first job, as without warming.
        """
        warmed: list[str] = []
        for task in tasks:
            if task.kind is not TaskKind.CLASSIFY or not task.labels:
                continue
            model = task.small.model
            try:
                info = self._client.model_info(model, timeout_s=task.small.timeout_s)
                if info.kind != "embed" or info.embedding_dimensions <= 0:
                    continue
                self.scorer(self._labels.get(model, task.labels, dimensions=info.embedding_dimensions))
            except (SmallfirstError, redis.RedisError) as exc:
                log.warning("label index of task %s not built ahead (%s); its first job builds it", task.name, exc)
                continue
            warmed.append(task.name)
        log.info("label indexes warmed for %d task(s): %s", len(warmed), ", ".join(warmed) or "none")
        return warmed

    def scorer(self, index: LabelIndex) -> LabelProbabilities:
        """The one scorer of `index` (the coalescer scores together the queries that share one)."""
        scorer = self._scorers.get(id(index))
        if scorer is None or scorer.index is not index:
            scorer = self._scorers[id(index)] = LabelProbabilities(index, self._temperature)
        return scorer

    def head_scorer(self, head: TrainedHead) -> HeadScores:
        """The one scorer of a live head (a new version is a new head, so a new scorer)."""
        scorer = self._head_scorers.get(id(head))
        if scorer is None or scorer.head is not head:
            scorer = self._head_scorers[id(head)] = HeadScores(head)
        return scorer

    def run(self, task: Task, job_input: dict[str, str], *, learn: bool = True) -> SmallAnswer:
        """`learn`: whether the job may teach its task (see `examples.learns_from`); the input of one
        that may not is never kept for training."""
        missing = [name for name in task.input_fields if name not in job_input]
        if missing:
            raise SmallTierTaskError(f"task {task.name}: input lacks field(s) {missing}")
        started = time.perf_counter()
        if task.kind is TaskKind.CLASSIFY:
            if self._client.model_info(task.small.model).kind == "embed":
                answer = self._classify_by_embedding(task, job_input, learn=learn)
            else:
                answer = self._classify_by_generation(task, job_input)
        elif task.kind is TaskKind.EXTRACT:
            answer = self._extract(task, job_input)
        else:
            answer = self._generate(task, job_input)
        return replace(answer, latency_ms=(time.perf_counter() - started) * 1e3)

    # ---- classify ---------------------------------------------------------------------------------
    def _classify_by_embedding(self, task: Task, job_input: dict[str, str], *, learn: bool = True) -> SmallAnswer:
        model = task.small.model
        text = "\n".join(job_input[name] for name in task.input_fields)
        dimensions = self._client.model_info(model).embedding_dimensions
        if dimensions <= 0:  # a server that has not reported its width: learn it from one call
            dimensions = int(self._client.embed(model, [text], truncate=True,
                                                timeout_s=task.small.timeout_s).vectors.shape[1])
        head = self._heads.get(task.name, model) if task.learns else None
        # A task's live trained head scores its inputs; the seed nearest-neighbour scorer until it
        # has one, and for tasks that do not learn.
        scorer: LabelProbabilities | HeadScores = (
            self.head_scorer(head) if head is not None
            else self.scorer(self._labels.get(model, task.labels, dimensions=dimensions)))
        # A classification reads the start of a long message; the rest is cut, not refused.
        with telemetry.gen_ai_span(k.GEN_AI_OPERATION_EMBEDDINGS, k.GEN_AI_PROVIDER_SMALLFIRST, model):
            embedded = self._coalescer.embed(model, text, timeout_s=task.small.timeout_s, scorer=scorer)
            telemetry.annotate_gen_ai_response(usage=Usage(input_tokens=embedded.prompt_tokens),
                                               response_model=embedded.model)
        if embedded.vector.shape[0] != dimensions or embedded.scores is None:
            raise InferenceFailed(f"{model} returned {embedded.vector.shape[0]} dimensions, expected {dimensions}")
        gate: LearnedGate | None = None
        if task.learns and learn:
            # The trainer reuses it should this job escalate and its frontier answer become an example,
            # and it may label it with the live head's answer to train the next head.
            remember_input_vector(self._cache, task.name, model, text_digest(text), embedded.vector)
        if isinstance(scorer, HeadScores):
            names = scorer.names
            probabilities = embedded.scores[:-1].astype(np.float64)
            gate = LearnedGate(version=scorer.head.version, threshold=scorer.head.threshold,
                               novelty=float(embedded.scores[-1]), novelty_floor=scorer.head.novelty_floor)
        else:
            names = scorer.names
            probabilities = embedded.scores
        order = np.argsort(-probabilities)
        best = int(order[0])
        return SmallAnswer(
            answer={"label": names[best]},
            confidence=float(probabilities[best]),
            usage=Usage(input_tokens=embedded.prompt_tokens),
            model=embedded.model,
            finish_reason="stop",
            latency_ms=0.0,
            alternatives=tuple((names[int(i)], float(probabilities[int(i)])) for i in order[: self._alternatives]),
            gate=gate,
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


@dataclass(frozen=True, eq=False)
class LabelProbabilities:
    """The scoring step of embedding classification: a matrix of query vectors (queries, dimensions)
    -> each query's label probabilities (queries, labels), rows summing to 1, labels in the order of
    `index.names`. One matrix product for the whole batch. Anything with this signature (a trained
    head over the same embeddings) can score in its place."""

    index: LabelIndex
    temperature: float

    @property
    def names(self) -> tuple[str, ...]:
        return self.index.names

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        return softmax(self.index.label_scores(np.atleast_2d(queries)), self.temperature)


@dataclass(frozen=True, eq=False)
class HeadScores:
    """A task's trained head in the place of `LabelProbabilities`: a matrix of query vectors
    (queries, dimensions) -> (queries, classes + 1): each query's class probabilities in the order
    of `names`, then its novelty (1 - cosine similarity to the nearest training example) in the
    last column, so that the coalescer's one scoring call per batch gives the head's gate too."""

    head: TrainedHead

    @property
    def names(self) -> tuple[str, ...]:
        return self.head.classes

    def __call__(self, queries: np.ndarray) -> np.ndarray:
        probabilities, novelty = self.head.scores(np.atleast_2d(queries))
        return np.hstack([probabilities.astype(np.float64), novelty.astype(np.float64)[:, None]])


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Along the last axis: one vector of scores, or one row per query."""
    values = scores.astype(np.float64)
    scaled = (values - values.max(axis=-1, keepdims=True)) / temperature
    weights = np.exp(scaled)
    result: np.ndarray = weights / weights.sum(axis=-1, keepdims=True)
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

"""The small-tier executor against real inference servers (real vLLM, CPU build) and a real Redis."""

from __future__ import annotations

import json

import pytest
import redis

from smallfirst.common import constants
from smallfirst.common.catalog import Catalog, Task
from smallfirst.small_worker.executor import SmallTierExecutor, SmallTierTaskError
from smallfirst.small_worker.inference_client import InferenceClient
from smallfirst.small_worker.label_index import label_texts, text_digest
from tests.inference_fixtures import EMBEDDING_MODEL, GENERATOR_MODEL, InferenceServerHandle

pytestmark = pytest.mark.vllm

# Banking77 messages that are not among the catalog's seed examples, with their intents.
BANKING77_MESSAGES = [
    ("It's been a week since I ordered my card and it's not here. Please help?", "card_arrival"),
    ("My card has been stolen what do I do?", "lost_or_stolen_card"),
    ("I need to know what your exchange rates are.", "exchange_rate"),
    ("Why was there a fee for my cash withdrawal?", "cash_withdrawal_charge"),
    ("What do I have to do to get my PIN unblocked?", "pin_blocked"),
]


def catalog_task(catalog: Catalog, name: str) -> Task:
    task = catalog.get(name)
    assert task is not None, f"the default catalog has no task {name}"
    return task


def on_model(task: Task, model: str) -> Task:
    return task.model_copy(update={"small": task.small.model_copy(update={"model": model})})


@pytest.fixture
def inference_client(embedding_server: InferenceServerHandle,
                     generator_server: InferenceServerHandle) -> InferenceClient:
    return InferenceClient({EMBEDDING_MODEL: embedding_server.target, GENERATOR_MODEL: generator_server.target})


@pytest.fixture
def cache(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def test_classify_answers_banking77_messages_with_a_confidence(
    catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis,
) -> None:
    # given
    task = catalog_task(catalog, "banking77_intent")
    executor = SmallTierExecutor(inference_client, cache)

    # when
    answers = [executor.run(task, {"text": text}) for text, _ in BANKING77_MESSAGES]

    # then
    assert [a.answer for a in answers] == [{"label": intent} for _, intent in BANKING77_MESSAGES]
    for answer in answers:
        assert answer.confidence is not None
        assert 0.0 < answer.confidence <= 1.0
        assert answer.alternatives[0] == (answer.answer["label"], answer.confidence)
        assert [p for _, p in answer.alternatives] == sorted((p for _, p in answer.alternatives), reverse=True)
        assert answer.usage.input_tokens > 0
        assert (answer.model, answer.finish_reason) == (EMBEDDING_MODEL, "stop")
        assert answer.latency_ms > 0


def test_label_embeddings_are_computed_once_and_cached_in_redis(
    catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis,
    embedding_server: InferenceServerHandle,
) -> None:
    # given: a first worker filled the cache
    task = catalog_task(catalog, "ticket_priority")
    SmallTierExecutor(inference_client, cache).run(task, {"text": "I cannot log in at all"})
    texts = {t for label in task.labels for t in label_texts(label)}
    keys = [constants.embedding_cache_key(EMBEDDING_MODEL, text_digest(t)) for t in texts]
    assert all(isinstance(raw, bytes) and len(raw) == 4 * 384 for raw in cache.mget(keys))
    embeds_before = embedding_server.metric("smallfirst_inference_requests_total", method="Embed", code="OK")

    # when: another worker process (a fresh executor) classifies
    answer = SmallTierExecutor(inference_client, cache).run(task, {"text": "Please add a dark mode"})

    # then: one embedding call, for the input alone
    assert answer.answer["label"] in task.label_names
    assert embedding_server.metric("smallfirst_inference_requests_total", method="Embed", code="OK") == (
        embeds_before + 1
    )


def test_classify_on_a_generator_returns_one_of_the_labels(
    catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis,
) -> None:
    # given
    task = on_model(catalog_task(catalog, "ticket_priority"), GENERATOR_MODEL)

    # when
    answer = SmallTierExecutor(inference_client, cache).run(task, {"text": "Our payments fail since this morning"})

    # then
    assert answer.answer["label"] in task.label_names
    assert answer.confidence is None
    assert answer.raw_text == answer.answer["label"]
    assert answer.usage.output_tokens > 0


def test_extract_returns_the_parsed_object_or_the_raw_text(
    catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis,
) -> None:
    # given
    task = catalog_task(catalog, "invoice_fields")
    assert task.small.model == GENERATOR_MODEL
    invoice = "Invoice INV-2291 from Acme GmbH, issued 3 March 2026, total due EUR 1,250.00 by 2 April 2026."

    # when
    answer = SmallTierExecutor(inference_client, cache).run(task, {"text": invoice})

    # then: random weights write JSON or run out of tokens; either way the answer says which
    assert answer.raw_text is not None
    assert answer.raw_text.lstrip().startswith("{")
    try:
        parsed = json.loads(answer.raw_text)
    except json.JSONDecodeError:
        assert answer.answer == answer.raw_text
        assert answer.finish_reason == "length"
    else:
        assert answer.answer == parsed
    assert 0 < answer.usage.output_tokens <= task.small.max_tokens
    assert answer.usage.input_tokens > 0


def test_generate_returns_text(catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis) -> None:
    # given
    task = catalog_task(catalog, "email_summary")

    # when
    answer = SmallTierExecutor(inference_client, cache).run(task, {"text": "Hi, please send the March invoice. Bo"})

    # then
    assert isinstance(answer.answer, str)
    assert answer.answer == (answer.raw_text or "").strip()
    assert answer.usage.output_tokens <= task.small.max_tokens


def test_extract_bound_to_an_embedding_model_is_a_task_error(
    catalog: Catalog, inference_client: InferenceClient, cache: redis.Redis,
) -> None:
    # given
    task = on_model(catalog_task(catalog, "invoice_fields"), EMBEDDING_MODEL)

    # when / then
    with pytest.raises(SmallTierTaskError, match="needs a generator"):
        SmallTierExecutor(inference_client, cache).run(task, {"text": "Invoice 1"})

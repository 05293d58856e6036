"""PromptTokenizer: the same ids as the model's tokenizer, without its Python layers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from smallfirst.inference.tokenization import PromptTokenizer
from tests.inference_fixtures import BANKING77_TRAIN, require_vllm

CONTEXT_TOKENS = 64


def banking77_texts(count: int) -> list[str]:
    with BANKING77_TRAIN.open(newline="") as handle:
        return [row["text"] for _, row in zip(range(count), csv.DictReader(handle), strict=False)]


# The models' closing special tokens: BERT ends a text with [SEP], the Llama generator with nothing.
CLOSING_TOKENS = {"embedding": 1, "generator": 0}


@pytest.fixture(params=sorted(CLOSING_TOKENS))
def model_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def model_tokenizer(model_kind: str, embedding_model_dir: Path, tiny_model_dir: Path) -> object:
    """The tokenizer as vLLM loads it for the engine (cached, thread-pooled, cut from the left)."""
    require_vllm()
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(embedding_model_dir if model_kind == "embedding" else tiny_model_dir))


def test_ids_match_the_model_tokenizer(model_tokenizer: object) -> None:
    # given
    texts = [*banking77_texts(300), "", "  spaces  and\ttabs\n", "émoji 🚀 and ünïcode"]
    tokenizer = PromptTokenizer(model_tokenizer, CONTEXT_TOKENS)

    # when
    ours = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    bare = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    batch = tokenizer.encode_batch(texts, truncate=False)

    # then
    assert tokenizer.uses_rust_tokenizer
    assert ours == [list(model_tokenizer.encode(t, add_special_tokens=True)) for t in texts]  # type: ignore[attr-defined]
    assert bare == [list(model_tokenizer.encode(t, add_special_tokens=False)) for t in texts]  # type: ignore[attr-defined]
    assert batch == ours


def test_truncation_keeps_the_start_and_the_closing_special_tokens(model_tokenizer: object, model_kind: str) -> None:
    # given: a text far longer than the context
    text = "my card has not arrived yet and I am worried because" + " it was sent weeks ago" * 50
    tokenizer = PromptTokenizer(model_tokenizer, CONTEXT_TOKENS)
    whole = tokenizer.encode(text, add_special_tokens=True)
    closing = CLOSING_TOKENS[model_kind]

    # when
    [cut] = tokenizer.encode_batch([text], truncate=True)

    # then: the first tokens survive, and the closing special tokens are still there
    assert len(whole) > CONTEXT_TOKENS
    assert cut == whole[: CONTEXT_TOKENS - closing] + whole[len(whole) - closing :]


def test_decode_drops_special_tokens_and_round_trips_text(model_tokenizer: object) -> None:
    # given
    tokenizer = PromptTokenizer(model_tokenizer, CONTEXT_TOKENS)
    text = "when will my new card arrive"
    ids = tokenizer.encode(text, add_special_tokens=True)

    # when
    decoded = tokenizer.decode(ids)

    # then
    assert decoded == model_tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]
    assert decoded.strip() == text

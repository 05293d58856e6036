"""Prompt and text tokenization for the engine wrapper, off the per-call hot path's Python layers.

The server tokenizes every prompt itself (to refuse one longer than the context before it reaches
the engine, and to report exact usage). Through transformers' `encode` that costs about twice what
the Rust `tokenizers.Tokenizer` underneath costs for the same ids, and with hundreds of short calls
per second on a small model the front end's CPU is the throughput (bench/small_tier.py). So fast
tokenizers are called directly, each from a private copy whose truncation and padding settings
nothing else changes; other tokenizers (sentencepiece-only, Mistral's) go through the model's own.

Truncation for embeddings keeps the start of a text and its closing special tokens: a support
message states its point first. (vLLM configures the tokenizers it loads to cut from the left, the
right thing for a chat prompt, so its setting is not used here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer


class PromptTokenizer:
    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self._model_tokenizer = tokenizer
        self._max_tokens = max_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._plain: Tokenizer | None = None
        self._truncating: Tokenizer | None = None
        if isinstance(backend, Tokenizer):
            serialized = backend.to_str()
            self._plain = Tokenizer.from_str(serialized)
            self._plain.no_truncation()
            self._plain.no_padding()
            self._truncating = Tokenizer.from_str(serialized)
            self._truncating.no_padding()
            self._truncating.enable_truncation(max_tokens, direction="right")

    @property
    def uses_rust_tokenizer(self) -> bool:
        return self._plain is not None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._plain is not None:
            return list(self._plain.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._model_tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of generated ids, special tokens left out (as vLLM's detokenizer writes it)."""
        if self._plain is not None:
            return str(self._plain.decode(list(token_ids), skip_special_tokens=True))
        return str(self._model_tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def encode_batch(self, texts: Sequence[str], truncate: bool) -> list[list[int]]:
        """Token ids with special tokens; cut to the model's context when `truncate`, else whole."""
        rust = self._truncating if truncate else self._plain
        if rust is not None:
            return [list(encoding.ids) for encoding in rust.encode_batch(list(texts), add_special_tokens=True)]
        encoded = [list(self._model_tokenizer.encode(text, add_special_tokens=True)) for text in texts]
        return [ids[: self._max_tokens] for ids in encoded] if truncate else encoded

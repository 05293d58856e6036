"""A tiny random-weight Llama for development and tests, served with `load_format="dummy"`.

The folder holds only a config, a tokenizer trained here with the `tokenizers` package, and a chat
template: vLLM fills the weights with random values, so nothing is downloaded. The answers are
gibberish, but constrained decoding (choices, regex, JSON schema) still shapes them, which is what
the small tier's plumbing needs. vLLM's CPU attention kernels support only some head sizes, and
64 is one of them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
# Role markers of the chat template; special so they are never split or produced by accident.
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Used when no corpus is given, so the command works anywhere; any text trains a usable
# byte-level tokenizer, since every byte is in its alphabet.
_FALLBACK_CORPUS = (
    "I am still waiting on my card, when will it arrive?",
    "Please extract the invoice number, the total amount and the due date.",
    "Summarize this email in two sentences for the support team.",
    "My transfer has not arrived yet and the exchange rate looks wrong.",
    "Customer support tickets, invoices and emails are routed to the smallest model.",
    '{"label": "card_arrival", "confidence": 0.93, "total": 120.50, "currency": "EUR"}',
)


# vllm/v1/attention/backends/cpu_attn.py, get_supported_head_sizes (GPU backends take these too).
_CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


@dataclass(frozen=True)
class TinyModelShape:
    """A Llama shape; the defaults are the tiny test model, larger ones suit GPU benchmarks."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 1
    max_position_embeddings: int = 4096
    vocab_size: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim not in _CPU_HEAD_DIMS:
            raise ValueError(f"head_dim {self.head_dim} is not one vLLM's CPU attention supports: {_CPU_HEAD_DIMS}")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes plus special tokens)")


def corpus_lines(paths: Iterable[Path]) -> Iterator[str]:
    """Lines of text files, or the `text` column of CSV files (e.g. Banking77's train.csv)."""
    for path in paths:
        with path.open(encoding="utf-8", newline="") as handle:
            if path.suffix == ".csv":
                for row in csv.DictReader(handle):
                    text = row.get("text")
                    if text:
                        yield text
            else:
                for line in handle:
                    if line.strip():
                        yield line.rstrip("\n")


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        ),
    ])
    return tokenizer


def write_tiny_model(directory: Path, corpus: Iterable[Path] = (), shape: TinyModelShape | None = None) -> Path:
    """Write config, tokenizer and chat template into `directory`; returns the folder."""
    shape = shape or TinyModelShape()
    shape.check()
    texts = list(corpus_lines(corpus)) or list(_FALLBACK_CORPUS)
    tokenizer = train_tokenizer(texts, shape.vocab_size)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))

    def token_id(token: str) -> int:
        value = tokenizer.token_to_id(token)
        if value is None:
            raise RuntimeError(f"special token {token} missing from the trained tokenizer")
        return int(value)

    bos_id, eos_id, pad_id = token_id(BOS_TOKEN), token_id(EOS_TOKEN), token_id(PAD_TOKEN)
    # The embedding matrix is sized by the config, not the trained vocabulary, which may stop
    # short of vocab_size on a small corpus; the extra rows are simply never produced.
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "max_position_embeddings": shape.max_position_embeddings,
        "vocab_size": shape.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "bfloat16",
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "model_max_length": shape.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    special_tokens_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    for name, content in (
        ("config.json", config),
        ("tokenizer_config.json", tokenizer_config),
        ("generation_config.json", generation_config),
        ("special_tokens_map.json", special_tokens_map),
    ):
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return directory

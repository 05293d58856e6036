"""`smallfirst make-tiny-model`: a config vLLM's CPU kernels accept and a tokenizer trained here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from smallfirst.inference.tiny_model import CHAT_TEMPLATE, TinyModelShape, write_tiny_model


def test_tiny_model_folder_holds_a_small_llama_and_a_working_tokenizer(tiny_model_dir: Path) -> None:
    # given
    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    text = "I am still waiting on my card, when will it arrive?"

    # when
    encoding = tokenizer.encode(text)

    # then
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["head_dim"]) == (2, 64)
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"]
    assert tokenizer.get_vocab_size() <= config["vocab_size"]
    assert encoding.ids[0] == config["bos_token_id"]
    assert tokenizer.decode(encoding.ids) == text
    assert len(encoding.ids) < len(text) / 2
    assert tokenizer_config["chat_template"] == CHAT_TEMPLATE
    assert (tiny_model_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def test_a_shape_the_cpu_kernels_refuse_is_rejected(tmp_path: Path) -> None:
    # given: head_dim 16, which vLLM's CPU attention does not support
    shape = TinyModelShape(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)

    # when / then
    with pytest.raises(ValueError, match="head_dim 16"):
        write_tiny_model(tmp_path / "bad", shape=shape)
    assert not (tmp_path / "bad").exists()

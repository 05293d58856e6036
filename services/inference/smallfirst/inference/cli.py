"""`smallfirst inference` (serve one model) and `smallfirst make-tiny-model DIR`.

Options override the SMALLFIRST_INFERENCE_* environment; vLLM is imported only when serving.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError


@click.command()
@click.option("--model-path", help="Model folder or Hugging Face id [env SMALLFIRST_INFERENCE_MODEL_PATH].")
@click.option("--served-model-name", help="Name clients ask for (default: the folder's name).")
@click.option("--runner", type=click.Choice(["auto", "generate", "pooling"]),
              help="generate, pooling (embeddings), or auto: from the architecture (default).")
@click.option("--dtype", help="Weights and activations type (default auto: bfloat16 where the hardware computes in it, "
                             "else float32).")
@click.option("--max-model-len", type=int, help="Context in tokens (default: the model's).")
@click.option("--load-format", help='"dummy" for random weights (the tiny model).')
@click.option("--kv-cache-space-gib", type=float, help="Explicit KV-cache size.")
@click.option("--max-num-seqs", type=int, help="Sequences batched per engine step.")
@click.option("--max-num-batched-tokens", type=int, help="Tokens scheduled per engine step.")
@click.option("--engine-metrics/--no-engine-metrics", default=None, help="Serve vLLM's own vllm:* metrics.")
@click.option("--enforce-eager/--no-enforce-eager", default=None, help="Skip torch.compile (faster start).")
@click.option("--host", help="Listen address (default 0.0.0.0).")
@click.option("--port", type=int, help="gRPC port (default 50051).")
@click.option("--metrics-port", type=int, help="Prometheus port; 0 disables (default 9103).")
@click.option("--drain-grace-s", type=float, help="Time in-flight calls get after SIGTERM.")
@click.option("--max-concurrent-requests", type=int, help="Calls served at once before RESOURCE_EXHAUSTED.")
@click.option("--max-message-bytes", type=int, help="gRPC message size limit (default 4 MiB).")
@click.option("--max-input-chars", type=int, help="Longest text tokenized (default 16 per context token).")
@click.option("--tls-cert-file", help="Serve TLS with this certificate chain (PEM); needs --tls-key-file.")
@click.option("--tls-key-file", help="The TLS certificate's private key (PEM).")
@click.option("--tls-client-ca-file", help="Require client certificates signed by this CA (mutual TLS).")
@click.option("--reflection/--no-reflection", default=None, help="gRPC server reflection (default off).")
def command(**options: Any) -> None:
    """Serve one model over gRPC (vLLM engine)."""
    from smallfirst.inference.settings import InferenceSettings

    overrides = {name: value for name, value in options.items() if value is not None}
    try:
        settings = InferenceSettings(**overrides)
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc
    from smallfirst.common import constants, telemetry

    telemetry.configure_logging(constants.SERVICE_INFERENCE, settings.log_level, json=settings.log_json)
    # Imported here: vLLM takes seconds to import and only this command needs it.
    from smallfirst.inference.server import build_server

    sys.exit(asyncio.run(build_server(settings).serve()))


@click.command("make-tiny-model")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--corpus", "corpus", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text or CSV (column 'text') to train the tokenizer on; repeatable. "
                   "Default: a few built-in sentences.")
@click.option("--vocab-size", type=int, default=2048, show_default=True)
@click.option("--hidden-size", type=int, default=128, show_default=True)
@click.option("--intermediate-size", type=int, default=256, show_default=True)
@click.option("--layers", type=int, default=2, show_default=True)
@click.option("--heads", type=int, default=2, show_default=True)
@click.option("--kv-heads", type=int, default=1, show_default=True)
@click.option("--max-context", type=int, default=4096, show_default=True)
def make_tiny_model(directory: Path, corpus: tuple[Path, ...], vocab_size: int, hidden_size: int,
                    intermediate_size: int, layers: int, heads: int, kv_heads: int, max_context: int) -> None:
    """Write a random-weight Llama (config, tokenizer, chat template) for load_format=dummy."""
    from smallfirst.inference.tiny_model import TinyModelShape, write_tiny_model

    shape = TinyModelShape(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_context,
        vocab_size=vocab_size,
    )
    try:
        path = write_tiny_model(directory, corpus, shape)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    click.echo(f"wrote {path} (serve it with --load-format dummy)")

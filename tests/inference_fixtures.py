"""Pytest plugin: inference servers (real vLLM, CPU build) started as real processes.

Fixtures:
- `tiny_model_dir`: a tiny random-weight generator written by `smallfirst make-tiny-model`
  (its folder is named `tiny-generator`, the served name the example catalog uses).
- `embedding_server`: the bundled all-MiniLM-L6-v2 served as `all-minilm-l6-v2`, for the session.
- `generator_server`: the tiny generator served as `tiny-generator`, for the session.
- `start_inference_server`: starts a server of the test's own (one it may kill or stop),
  stopped after the test.

Each server takes 20-60 s to start on two cores, so the two session servers are shared by every
test folder. Where vLLM is not installed the tests are skipped, and fail under CI=true.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import ManagedProcess, free_port

CLI_ENTRY = "from smallfirst.cli.main import main; main()"
EMBEDDING_MODEL = "all-minilm-l6-v2"
GENERATOR_MODEL = "tiny-generator"
# Long enough to be tested with, small enough for two cores (prompt plus completion).
GENERATOR_CONTEXT_TOKENS = 4096
START_TIMEOUT_S = 400.0
BANKING77_TRAIN = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "banking77" / "train.csv"


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        message = "vLLM is not installed (pip install -e '.[inference-cpu]')"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@dataclass
class InferenceServerHandle:
    name: str
    model: str
    port: int
    metrics_port: int
    process: ManagedProcess
    # For a server serving TLS: the credentials a client needs (None: plaintext).
    credentials: grpc.ChannelCredentials | None = None

    def channel(self) -> grpc.Channel:
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials)
        return grpc.insecure_channel(self.target)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def health(self, service: str = "") -> int:
        """The health status (health_pb2.HealthCheckResponse.SERVING, NOT_SERVING...)."""
        with self.channel() as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2.0
            )
        return int(response.status)

    def serving(self) -> bool:
        try:
            return self.health() == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def metrics(self) -> dict[str, float]:
        """Every sample of the metrics endpoint, keyed `name{label="value",...}` (labels sorted)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        samples: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                samples[f"{sample.name}{{{labels}}}"] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        wanted = [f'{k}="{v}"' for k, v in labels.items()]
        return sum(
            value for key, value in self.metrics().items()
            if key.split("{", 1)[0] == name and all(w in key for w in wanted)
        )


def start_server(logs_dir: Path, name: str, model_path: Path, model: str, *extra: str,
                 credentials: grpc.ChannelCredentials | None = None) -> InferenceServerHandle:
    require_vllm()
    port, metrics_port = free_port(), free_port()
    argv = [
        sys.executable, "-c", CLI_ENTRY, "inference",
        "--model-path", str(model_path), "--served-model-name", model,
        "--port", str(port), "--metrics-port", str(metrics_port), "--host", "127.0.0.1",
        # Keep the engine small on shared CPUs; eager mode starts twice as fast as compiled.
        "--kv-cache-space-gib", "1", "--enforce-eager", *extra,
    ]
    env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "SMALLFIRST_INFERENCE_LOG_LEVEL": "INFO"}
    process = ManagedProcess(name, argv, logs_dir, env=env).start()
    handle = InferenceServerHandle(name, model, port, metrics_port, process, credentials)
    try:
        process.wait_ready(handle.serving, timeout_s=START_TIMEOUT_S)
    except (RuntimeError, TimeoutError):
        process.stop()
        raise
    return handle


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, logs_dir: Path) -> Path:
    """The tiny generator's folder, written by the real command."""
    directory = tmp_path_factory.mktemp("models") / GENERATOR_MODEL
    corpus = ["--corpus", str(BANKING77_TRAIN)] if BANKING77_TRAIN.is_file() else []
    process = ManagedProcess(
        "make-tiny-model",
        [sys.executable, "-c", CLI_ENTRY, "make-tiny-model", str(directory),
         "--max-context", str(GENERATOR_CONTEXT_TOKENS), *corpus],
        logs_dir,
    ).start()
    assert process.proc is not None
    if process.proc.wait(timeout=120) != 0:
        pytest.fail(f"make-tiny-model failed:\n{process.tail()}")
    return directory


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    require_vllm()
    from smallfirst.inference.models import bundled_embedding_model_path

    return bundled_embedding_model_path()


def _session_server(handle: InferenceServerHandle) -> InferenceServerHandle:
    if not handle.process.alive():
        pytest.fail(f"the session's inference server {handle.name} died:\n{handle.process.tail()}")
    return handle


@pytest.fixture(scope="session")
def embedding_server_session(logs_dir: Path, embedding_model_dir: Path) -> Iterator[InferenceServerHandle]:
    handle = start_server(logs_dir, "inference-embed", embedding_model_dir, EMBEDDING_MODEL)
    yield handle
    handle.process.stop()


@pytest.fixture
def embedding_server(embedding_server_session: InferenceServerHandle) -> InferenceServerHandle:
    """The session's embedding server (all-minilm-l6-v2)."""
    return _session_server(embedding_server_session)


@pytest.fixture(scope="session")
def generator_server_session(logs_dir: Path, tiny_model_dir: Path) -> Iterator[InferenceServerHandle]:
    handle = start_server(logs_dir, "inference-generate", tiny_model_dir, GENERATOR_MODEL,
                          "--load-format", "dummy", "--max-model-len", str(GENERATOR_CONTEXT_TOKENS))
    yield handle
    handle.process.stop()


@pytest.fixture
def generator_server(generator_server_session: InferenceServerHandle) -> InferenceServerHandle:
    """The session's tiny generator server (tiny-generator, random weights)."""
    return _session_server(generator_server_session)


@pytest.fixture
def start_inference_server(logs_dir: Path, embedding_model_dir: Path,
                           tiny_model_dir: Path) -> Iterator[Callable[..., InferenceServerHandle]]:
    """`start_inference_server("embed" | "generate", *extra_cli_args)`: a server of the test's own."""
    started: list[InferenceServerHandle] = []

    def start(kind: str, *extra: str, credentials: grpc.ChannelCredentials | None = None) -> InferenceServerHandle:
        name = f"inference-{kind}-own-{len(started) + 1}-{free_port()}"
        if kind == "embed":
            handle = start_server(logs_dir, name, embedding_model_dir, EMBEDDING_MODEL, *extra,
                                  credentials=credentials)
        elif kind == "generate":
            handle = start_server(logs_dir, name, tiny_model_dir, GENERATOR_MODEL, "--load-format", "dummy",
                                  "--max-model-len", str(GENERATOR_CONTEXT_TOKENS), *extra, credentials=credentials)
        else:
            raise ValueError(f"unknown server kind {kind!r}")
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.process.stop()


"""The inference service's edges: TLS as an option (clients without it are refused), no reflection
unless asked for, and a text too long to fit refused before it is tokenized. A real inference
server (vLLM's CPU build) of the test's own, and the small worker's real client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from smallfirst.small_worker.inference_client import (
    ChannelTls,
    InferenceClient,
    InferenceInputTooLong,
    InferenceUnavailable,
    RetryPolicy,
)
from tests.inference_fixtures import EMBEDDING_MODEL, InferenceServerHandle
from tests.support.tls import make_certificates

pytestmark = pytest.mark.vllm

MAX_INPUT_CHARS = 5000


def test_tls_server_serves_trusting_clients_only_without_reflection_and_refuses_overlong_texts_untokenized(
        start_inference_server: Callable[..., InferenceServerHandle], tmp_path: Path) -> None:
    # given: an embedding server serving TLS only, with its defaults otherwise (no reflection)
    certs = make_certificates(tmp_path / "certs")
    tls = ChannelTls.from_files(str(certs.ca_file))
    server = start_inference_server(
        "embed", "--tls-cert-file", str(certs.cert_file), "--tls-key-file", str(certs.key_file),
        "--max-input-chars", str(MAX_INPUT_CHARS), credentials=tls.credentials())

    # when / then: a TLS client that trusts the server's CA is served
    with InferenceClient({EMBEDDING_MODEL: server.target}, tls=tls, default_timeout_s=60.0) as client:
        assert client.embed(EMBEDDING_MODEL, ["Where is my new card?"]).vectors.shape == (1, 384)
        # a text longer than the server tokenizes is refused, saying so; a truncating embed is cut
        with pytest.raises(InferenceInputTooLong, match="characters"):
            client.embed(EMBEDDING_MODEL, ["x" * (MAX_INPUT_CHARS + 1)])
        assert client.embed(EMBEDDING_MODEL, ["card " * 2000], truncate=True).prompt_tokens == 256

    # a plaintext client gets no answer at all
    with grpc.insecure_channel(server.target) as plain, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

    # a client trusting another CA is not served either
    other = ChannelTls.from_files(str(make_certificates(tmp_path / "other").ca_file))
    with InferenceClient({EMBEDDING_MODEL: server.target}, tls=other, default_timeout_s=5.0,
                         retry=RetryPolicy(max_attempts=1)) as untrusting, pytest.raises(InferenceUnavailable):
        untrusting.embed(EMBEDDING_MODEL, ["Where is my new card?"])

    # and reflection is not served
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as unimplemented:
            list(stub.ServerReflectionInfo(requests, timeout=5))
    assert unimplemented.value.code() is grpc.StatusCode.UNIMPLEMENTED

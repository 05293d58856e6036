"""The inference service against real servers running real vLLM (CPU build)."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable

import grpc
import jsonschema
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from smallfirst.small_worker.inference_client import (
    Constraint,
    InferenceClient,
    InferenceDeadlineExceeded,
    InferenceError,
    InferenceInputTooLong,
    InferenceInvalidRequest,
    InferenceUnavailable,
    RetryPolicy,
)
from tests.inference_fixtures import (
    EMBEDDING_MODEL,
    GENERATOR_CONTEXT_TOKENS,
    GENERATOR_MODEL,
    InferenceServerHandle,
)
from tests.support.procs import wait_until

pytestmark = pytest.mark.vllm

# A regex no completion within the context can satisfy: generation runs until max_tokens.
ENDLESS = Constraint(regex="[a-z]{100000}")
LONG_MAX_TOKENS = GENERATOR_CONTEXT_TOKENS - 64


def client_for(*servers: InferenceServerHandle, attempts: int = 4) -> InferenceClient:
    target = "ipv4:" + ",".join(s.target for s in servers) if len(servers) > 1 else servers[0].target
    return InferenceClient({servers[0].model: target}, default_timeout_s=60.0,
                           retry=RetryPolicy(max_attempts=attempts, initial_backoff_s=0.05, max_backoff_s=0.5))


def engine_idle(server: InferenceServerHandle) -> bool:
    return server.metric("smallfirst_inference_engine_unfinished_requests") == 0


# ---- embeddings ---------------------------------------------------------------------------------
def test_embeddings_are_unit_vectors_in_request_order(embedding_server: InferenceServerHandle) -> None:
    # given
    texts = ["My card still has not arrived", "When will my new card be delivered?", "What is the exchange rate?"]
    with client_for(embedding_server) as client:
        # when
        result = client.embed(EMBEDDING_MODEL, texts)
        info = client.model_info(EMBEDDING_MODEL)

    # then
    assert result.vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(result.vectors, axis=1), 1.0, atol=1e-4)
    similarity = result.vectors @ result.vectors.T
    assert similarity[0, 1] > similarity[0, 2]
    assert result.prompt_tokens > len(texts)
    assert (info.kind, info.embedding_dimensions, info.max_context_tokens) == ("embed", 384, 256)


def test_text_longer_than_the_context_is_refused_unless_truncated(embedding_server: InferenceServerHandle) -> None:
    # given
    long_text = "my card has not arrived " * 200
    with client_for(embedding_server) as client:
        # when / then
        with pytest.raises(InferenceInputTooLong, match="256"):
            client.embed(EMBEDDING_MODEL, [long_text])
        truncated = client.embed(EMBEDDING_MODEL, [long_text], truncate=True)

    assert truncated.prompt_tokens == 256


# ---- generation ---------------------------------------------------------------------------------
def test_choice_constrained_generation_always_returns_a_choice(generator_server: InferenceServerHandle) -> None:
    # given
    choices = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    with client_for(generator_server) as client:
        # when: random weights, sampled, and a max_tokens far below the longest choice
        generations = [
            client.generate(GENERATOR_MODEL, messages=[("user", "Where is my card?")], temperature=1.0, seed=seed,
                            max_tokens=1, constraint=Constraint(choices=choices))
            for seed in range(12)
        ]

    # then
    assert all(g.text in choices for g in generations), [g.text for g in generations]
    assert all(g.finish_reason == "stop" for g in generations)
    assert len({g.text for g in generations}) > 1


def test_json_schema_generation_yields_valid_json_when_it_stops(generator_server: InferenceServerHandle) -> None:
    # given
    schema = {
        "type": "object",
        "properties": {"priority": {"enum": ["low", "high"]}, "urgent": {"type": "boolean"}},
        "required": ["priority", "urgent"],
        "additionalProperties": False,
    }
    with client_for(generator_server) as client:
        # when
        generations = [
            client.generate(GENERATOR_MODEL, prompt="Ticket: my card was stolen", temperature=1.0, seed=seed,
                            max_tokens=96, constraint=Constraint(json_schema=schema))
            for seed in range(6)
        ]

    # then: a finished answer is valid; one cut off by max_tokens is a prefix (a validation failure)
    finished = [g for g in generations if g.finish_reason == "stop"]
    assert finished
    for generation in finished:
        jsonschema.validate(json.loads(generation.text), schema)
    for generation in generations:
        assert generation.text.lstrip().startswith("{")


def test_stream_deltas_add_up_to_the_unary_completion(generator_server: InferenceServerHandle) -> None:
    # given
    prompt = "I lost my card yesterday"
    with client_for(generator_server) as client:
        # when
        whole = client.generate(GENERATOR_MODEL, prompt=prompt, temperature=0.0, max_tokens=24, logprobs=2)
        deltas = list(client.generate_stream(GENERATOR_MODEL, prompt=prompt, temperature=0.0, max_tokens=24,
                                             logprobs=2))
        # decoded once at the end by the server, not step by step by vLLM
        plain = client.generate(GENERATOR_MODEL, prompt=prompt, temperature=0.0, max_tokens=24)

    # then
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == whole.text == plain.text
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == whole.finish_reason == "length"
    assert deltas[-1].completion_tokens == whole.completion_tokens == 24
    assert sum(len(d.logprobs) for d in deltas) == len(whole.logprobs) == 24
    assert all(len(item.top) == 2 for item in whole.logprobs)


def test_chat_messages_are_rendered_with_the_chat_template(generator_server: InferenceServerHandle) -> None:
    # given
    with client_for(generator_server) as client:
        # when
        chat = client.generate(GENERATOR_MODEL, messages=[("system", "Be brief."), ("user", "Hi")], max_tokens=1)
        plain = client.generate(GENERATOR_MODEL, prompt="Hi", max_tokens=1)

    # then: the template adds role markers and the assistant's turn around the same words
    assert chat.prompt_tokens > plain.prompt_tokens + 4


def test_bad_requests_are_refused_with_their_reason(generator_server: InferenceServerHandle) -> None:
    # given
    with client_for(generator_server) as client:
        # when / then
        with pytest.raises(InferenceInvalidRequest, match="prompt is empty"):
            client.generate(GENERATOR_MODEL, prompt="   ")
        with pytest.raises(InferenceInvalidRequest, match="json_schema is not valid JSON"):
            client.generate(GENERATOR_MODEL, prompt="x", constraint=Constraint(json_schema="{not json"))
        with pytest.raises(InferenceInvalidRequest, match="not a valid JSON schema"):
            client.generate(GENERATOR_MODEL, prompt="x", constraint=Constraint(json_schema={"type": 12}))
        with pytest.raises(InferenceInvalidRequest, match="regex"):
            client.generate(GENERATOR_MODEL, prompt="x", constraint=Constraint(regex="[a-"))
        with pytest.raises(InferenceInvalidRequest, match="serves a generator"):
            client.embed(GENERATOR_MODEL, ["x"])
        with pytest.raises(InferenceInputTooLong, match=f"context is {GENERATOR_CONTEXT_TOKENS}"):
            client.generate(GENERATOR_MODEL, prompt="card " * (2 * GENERATOR_CONTEXT_TOKENS))


# ---- cancellation and deadlines --------------------------------------------------------------------
def test_cancelled_stream_aborts_its_engine_request(generator_server: InferenceServerHandle) -> None:
    # given: a generation that would run for thousands of tokens
    tokens_before = generator_server.metric("smallfirst_inference_generated_tokens_total")
    aborted_before = generator_server.metric("smallfirst_inference_aborted_requests_total")
    with client_for(generator_server) as client:
        stream = client.generate_stream(GENERATOR_MODEL, prompt="x", max_tokens=LONG_MAX_TOKENS, constraint=ENDLESS)
        first = next(stream)
        assert first.text
        assert generator_server.metric("smallfirst_inference_engine_unfinished_requests") == 1

        # when
        stream.close()

        # then: the engine dropped the request, which never completed (no tokens counted)
        # (the call's own bookkeeping runs just after the engine dropped the request)
        wait_until(lambda: engine_idle(generator_server)
                   and generator_server.metric("smallfirst_inference_aborted_requests_total") > aborted_before,
                   30, "the engine to drop the cancelled request")
    assert generator_server.metric("smallfirst_inference_aborted_requests_total") == aborted_before + 1
    assert generator_server.metric("smallfirst_inference_requests_total", method="GenerateStream",
                                   code="CANCELLED") >= 1
    assert generator_server.metric("smallfirst_inference_generated_tokens_total") == tokens_before


def test_deadline_exceeded_raises_and_aborts_the_engine_request(generator_server: InferenceServerHandle) -> None:
    # given
    tokens_before = generator_server.metric("smallfirst_inference_generated_tokens_total")
    deadlines_before = generator_server.metric("smallfirst_inference_requests_total", method="Generate",
                                               code="DEADLINE_EXCEEDED")
    # when / then
    with client_for(generator_server) as client, pytest.raises(InferenceDeadlineExceeded):
        client.generate(GENERATOR_MODEL, prompt="x", max_tokens=LONG_MAX_TOKENS, constraint=ENDLESS, timeout_s=0.5)

    wait_until(lambda: engine_idle(generator_server), 30, "the engine to drop the timed-out request")
    wait_until(
        lambda: generator_server.metric("smallfirst_inference_requests_total", method="Generate",
                                        code="DEADLINE_EXCEEDED") == deadlines_before + 1,
        10, "the server to count the deadline",
    )
    assert generator_server.metric("smallfirst_inference_generated_tokens_total") == tokens_before


# ---- shutdown and failover -----------------------------------------------------------------------------
def test_sigterm_turns_health_not_serving_and_drains_the_call_in_flight(
    start_inference_server: Callable[..., InferenceServerHandle],
) -> None:
    # given: a server with a long generation in flight
    server = start_inference_server("generate")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=1500),
                                     constraint=pb.Constraint(regex="[a-z]{100000}"))
        stream = stub.GenerateStream(request, timeout=120)
        assert next(stream).text

        # when: SIGTERM to the server process alone, as Kubernetes sends it to the container's PID 1
        server.process.signal(signal.SIGTERM, group=False)

        # then: health says NOT_SERVING at once, new calls are refused, the call in flight completes
        wait_until(lambda: server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "NOT_SERVING")
        assert server.health("smallfirst.inference.v1.InferenceService") == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(prompt="x"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].usage.completion_tokens == 1500
    assert server.process.proc is not None
    assert server.process.proc.wait(timeout=60) == 0


def test_killed_replica_is_failed_over_and_a_lone_dead_one_is_unavailable(
    embedding_server: InferenceServerHandle, start_inference_server: Callable[..., InferenceServerHandle],
) -> None:
    # given: two replicas behind one round_robin target, and calls flowing from eight threads
    spare = start_inference_server("embed")
    failures: list[InferenceError] = []
    served = [0]
    stop = threading.Event()
    with client_for(embedding_server, spare, attempts=6) as client:
        def caller() -> None:
            while not stop.is_set():
                try:
                    client.embed(EMBEDDING_MODEL, ["my card is lost", "exchange rate"], timeout_s=30)
                    served[0] += 1
                except InferenceError as exc:
                    failures.append(exc)

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_until(lambda: spare.metric("smallfirst_inference_requests_total", method="Embed", code="OK") >= 10,
                   60, "calls to reach the spare replica")

        # when: the spare dies mid-traffic
        spare.process.kill()
        served_at_kill = served[0]
        wait_until(lambda: served[0] >= served_at_kill + 50, 60, "calls to go on after the kill")
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    # then: no call failed, and a client of the dead replica alone gets InferenceUnavailable
    assert failures == []
    with client_for(spare, attempts=3) as lonely, pytest.raises(InferenceUnavailable, match="after 3 attempts"):
        lonely.embed(EMBEDDING_MODEL, ["my card is lost"], timeout_s=30)

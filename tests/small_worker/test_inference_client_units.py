"""The client's pure parts: target parsing, backoff, choice room, softmax; and a target with no server."""

from __future__ import annotations

import numpy as np
import pytest

from smallfirst.small_worker.executor import choice_max_tokens, softmax
from smallfirst.small_worker.inference_client import (
    InferenceClient,
    InferenceUnavailable,
    RetryPolicy,
    UnknownModel,
    parse_targets,
)
from tests.support.procs import free_port


def test_targets_parse_from_an_environment_string_with_multi_address_targets() -> None:
    # given
    spec = "all-minilm-l6-v2=dns:///inference-embed:50051, tiny=ipv4:10.0.0.1:50051,10.0.0.2:50051"

    # when
    targets = parse_targets(spec)

    # then
    assert targets == {"all-minilm-l6-v2": "dns:///inference-embed:50051", "tiny": "ipv4:10.0.0.1:50051,10.0.0.2:50051"}


@pytest.mark.parametrize("spec", ["", "=x", "model-without-target", "a=", ",,"])
def test_malformed_targets_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="target"):
        parse_targets(spec)


def test_backoff_is_jittered_below_a_capped_exponential() -> None:
    # given
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)

    # when
    pauses = {attempt: [policy.backoff_s(attempt) for _ in range(200)] for attempt in (1, 2, 3, 6)}

    # then
    assert max(pauses[1]) <= 0.1
    assert max(pauses[2]) <= 0.2
    assert max(pauses[3]) <= 0.4
    assert max(pauses[6]) <= 1.0 < 0.1 * 2**5
    assert len(set(pauses[6])) > 100


def test_choice_room_covers_the_longest_choice_byte_by_byte() -> None:
    assert choice_max_tokens(["low", "urgent", "çà"]) == len("urgent") + 1
    assert choice_max_tokens(["çàü"]) == 7


def test_softmax_confidence_grows_with_the_margin() -> None:
    # given
    close = np.array([0.60, 0.59, 0.20], dtype=np.float32)
    clear = np.array([0.60, 0.40, 0.20], dtype=np.float32)

    # when
    p_close, p_clear = softmax(close, 0.05), softmax(clear, 0.05)

    # then
    assert p_close.sum() == pytest.approx(1.0)
    assert p_clear.sum() == pytest.approx(1.0)
    assert 0.4 < p_close[0] < 0.6
    assert p_clear[0] > 0.95


def test_a_target_without_a_server_is_unavailable_after_bounded_retries() -> None:
    # given
    client = InferenceClient({"m": f"127.0.0.1:{free_port()}"},
                             retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02))

    # when / then
    with client, pytest.raises(InferenceUnavailable, match="after 3 attempts"):
        client.embed("m", ["x"], timeout_s=10)


def test_a_model_without_a_target_is_refused() -> None:
    with InferenceClient({"m": "127.0.0.1:1"}) as client, pytest.raises(UnknownModel, match="no inference target"):
        client.embed("other", ["x"])

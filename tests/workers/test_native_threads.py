"""A small-worker process caps its native thread pools (numpy's BLAS) at its bootstrap, so that its
many job threads never each start a pool of BLAS threads on the same cores."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from smallfirst.common import constants as k
from tests.support.procs import ManagedProcess, free_port, python_argv


def native_thread_samples(metrics_url: str) -> list[tuple[dict[str, str], float]]:
    try:
        body = httpx.get(metrics_url, timeout=2).text
    except httpx.HTTPError:
        return []
    return [(sample.labels, sample.value) for family in text_string_to_metric_families(body)
            if family.name == "smallfirst_native_threads" for sample in family.samples]


@pytest.mark.parametrize("native_threads", ["1", "3"])
def test_small_worker_process_runs_its_blas_pool_with_the_configured_threads(
        redis_url: str, catalog_path: Path, tmp_path: Path, logs_dir: Path, native_threads: str) -> None:
    # given: a small worker with many job threads, on a real Redis, its metrics on a free port
    port = free_port()
    env = {
        **os.environ,
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(catalog_path),
        "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"),
        "SMALLFIRST_INFERENCE_TARGETS": '{"all-minilm-l6-v2": "127.0.0.1:1"}',
        "SMALLFIRST_METRICS_PORT": str(port),
        "SMALLFIRST_NATIVE_THREADS": native_threads,
        "SMALLFIRST_LOG_JSON": "false",
    }
    worker = ManagedProcess(f"small-worker-native-threads-{native_threads}",
                            python_argv("-m", "smallfirst.cli", "worker", "--pool", k.POOL_SMALL,
                                        "--concurrency", "16"), logs_dir, env=env).start()
    try:
        # when: the worker has started and serves its metrics
        url = f"http://127.0.0.1:{port}/metrics"
        worker.wait_ready(lambda: bool(native_thread_samples(url)), timeout_s=120)
        samples = native_thread_samples(url)
    finally:
        worker.stop()

    # then: numpy's BLAS pool is loaded in that process and runs the configured threads, as does every other pool
    assert any(labels["api"] == "blas" for labels, _ in samples), samples
    assert {value for _, value in samples} == {float(native_threads)}, samples

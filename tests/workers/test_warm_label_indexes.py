"""A small worker builds the label indexes of the catalog's classify tasks when it starts, in the
background, so that no job waits for them; with the inference service down it starts all the same
and leaves them to the first job."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Catalog
from smallfirst.small_worker.label_index import label_texts, text_digest
from tests.inference_fixtures import EMBEDDING_MODEL, InferenceServerHandle
from tests.support.procs import ManagedProcess, python_argv, wait_until


def small_worker(logs_dir: Path, name: str, redis_url: str, catalog_path: Path, tmp_path: Path,
                 target: str) -> ManagedProcess:
    env = {
        **os.environ,
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(catalog_path),
        "SMALLFIRST_HEARTBEAT_DIR": str(tmp_path / "heartbeats"),
        "SMALLFIRST_INFERENCE_TARGETS": f'{{"{EMBEDDING_MODEL}": "{target}"}}',
        "SMALLFIRST_METRICS_PORT": "0",
        "SMALLFIRST_LOG_JSON": "false",
    }
    return ManagedProcess(name, python_argv("-m", "smallfirst.cli", "worker", "--pool", k.POOL_SMALL,
                                            "--concurrency", "4"), logs_dir, env=env).start()


def label_cache_keys(catalog: Catalog, task_name: str) -> list[str]:
    task = catalog.get(task_name)
    assert task is not None
    texts = {text for label in task.labels for text in label_texts(label)}
    return [k.embedding_cache_key(EMBEDDING_MODEL, text_digest(text)) for text in texts]


@pytest.mark.vllm
def test_a_starting_small_worker_embeds_the_label_texts_of_the_catalogs_classify_tasks_before_any_job(
        embedding_server: InferenceServerHandle, redis_url: str, catalog: Catalog, catalog_path: Path,
        tmp_path: Path, logs_dir: Path) -> None:
    # given: an empty label cache and no job at all
    client = redis.Redis.from_url(redis_url)
    keys = label_cache_keys(catalog, "banking77_intent")
    client.delete(*keys)

    # when: a small worker starts
    worker = small_worker(logs_dir, "small-worker-warm", redis_url, catalog_path, tmp_path, embedding_server.target)
    try:
        # then: every label text of the Banking77 task gets its vector, with no job submitted
        wait_until(lambda: client.exists(*keys) == len(keys), timeout_s=600, what="the label texts' vectors")
        # The vectors are written before the worker logs the warm-up as done: wait for the line
        # rather than race it.
        wait_until(lambda: "label indexes warmed for" in worker.log_path.read_text(errors="replace"),
                   timeout_s=120, what="the warm-up's closing log line")
        assert worker.proc is not None
        assert worker.proc.poll() is None
    finally:
        worker.stop()


def test_a_small_worker_starts_with_the_inference_service_down_and_leaves_the_labels_to_the_first_job(
        redis_url: str, catalog_path: Path, tmp_path: Path, logs_dir: Path) -> None:
    # given: no inference service behind the target
    # when: a small worker starts
    worker = small_worker(logs_dir, "small-worker-no-inference", redis_url, catalog_path, tmp_path, "127.0.0.1:1")
    try:
        # then: it says the indexes were not built ahead, and keeps running
        wait_until(lambda: "not built ahead" in worker.log_path.read_text(errors="replace"), timeout_s=120,
                   what="the warm-up's warning")
        assert worker.proc is not None
        assert worker.proc.poll() is None
    finally:
        worker.stop()

"""Whole-pipeline throughput and routing quality for classify jobs.

    .venv/bin/python bench/pipeline.py [--jobs 1000] [--batch 100] [--dataset PATH]

In one run on the same machine:
- baseline: vLLM offline in-process (`LLM.embed`) on the same texts: the engine's best case.
- pipeline: the whole stack as separate processes (API, Redis, small and frontier worker pools,
  the inference service, the frontier simulator answering as an oracle from the dataset's labels),
  the texts submitted as Banking77 classify jobs through `POST /v1/jobs/batch`, timed from the
  first submission to the last job's end.
The baseline runs first and is shut down before the stack starts, so they never share the CPUs.

Routing quality on the same jobs: accuracy of the final answers, and the share of jobs the small
tier kept (the rest escalated to the frontier, which the oracle answers correctly: the reference
"frontier always right" setting of shared/REFERENCE.md, "Routing quality references").
Evaluation texts are the dataset's messages after the catalog's seed examples.

The last line printed is one JSON object with the figures and the ratio pipeline/offline.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import TenantRegistry

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
SEEDS_PER_INTENT = 10  # scripts/make_banking77_catalog.py


def evaluation_rows(dataset: Path, count: int) -> list[tuple[str, str]]:
    """Messages after each intent's seed examples, interleaved across intents."""
    per_intent: dict[str, list[str]] = defaultdict(list)
    with dataset.open(newline="") as handle:
        for row in csv.DictReader(handle):
            per_intent[row["category"]].append(row["text"].strip())
    held_out = {intent: texts[SEEDS_PER_INTENT:] for intent, texts in per_intent.items()}
    rows: list[tuple[str, str]] = []
    depth = 0
    while len(rows) < count and any(depth < len(t) for t in held_out.values()):
        for intent, texts in held_out.items():
            if depth < len(texts) and len(rows) < count:
                rows.append((texts[depth], intent))
        depth += 1
    return rows


def offline_embed(texts: list[str], model_path: str, queue: Any) -> None:
    from vllm import LLM

    # The same engine settings the inference service runs with (1 GiB of KV cache, eager mode).
    llm = LLM(model=model_path, runner="pooling", enforce_eager=True, dtype="bfloat16", kv_cache_memory_bytes=2**30)
    llm.embed(texts[:64])  # warm-up
    started = time.perf_counter()
    llm.embed(texts)
    queue.put(len(texts) / (time.perf_counter() - started))
    del llm
    gc.collect()


def run_pipeline(stack: Stack, rows: list[tuple[str, str]], batch: int) -> dict[str, Any]:
    tenant = TenantRegistry(redis.Redis.from_url(stack.redis_url)).create("bench")
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as client:
        # Warm-up: the label index (label and seed-example embeddings) is built on first use.
        warm = client.post("/v1/jobs", json={"task": "banking77_intent", "input": {"text": rows[0][0]}}).json()
        client.get(f"/v1/jobs/{warm['id']}", params={"wait": 60})
        started = time.perf_counter()
        ids: list[str] = []
        for start in range(0, len(rows), batch):
            body = {"jobs": [{"task": "banking77_intent", "input": {"text": text}}
                             for text, _ in rows[start:start + batch]]}
            response = client.post("/v1/jobs/batch", json=body)
            response.raise_for_status()
            ids.extend(item["job"]["id"] for item in response.json()["results"])
        jobs: dict[str, dict[str, Any]] = {}
        for job_id in ids:
            while True:
                job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
                if job["status"] in {"succeeded", "failed", "cancelled"}:
                    jobs[job_id] = job
                    break
        elapsed_s = time.perf_counter() - started
    ended = [jobs[i] for i in ids]
    correct = sum(1 for job, (_, label) in zip(ended, rows, strict=True)
                  if job["status"] == "succeeded" and job["result"] == {"label": label})
    small_kept = [(job, label) for job, (_, label) in zip(ended, rows, strict=True)
                  if job["status"] == "succeeded" and job["attempts"][-1]["tier"] == "small"]
    small_correct = sum(1 for job, label in small_kept if job["result"] == {"label": label})
    return {
        "jobs": len(rows),
        "pipeline_jobs_per_s": round(len(rows) / elapsed_s, 2),
        "succeeded": sum(1 for job in ended if job["status"] == "succeeded"),
        "accuracy": round(correct / len(rows), 4),
        "small_share": round(len(small_kept) / len(rows), 4),
        "frontier_share": round(1 - len(small_kept) / len(rows), 4),
        "small_tier_accuracy": round(small_correct / max(1, len(small_kept)), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    args = parser.parse_args()
    rows = evaluation_rows(args.dataset, args.jobs)
    texts = [text for text, _ in rows]

    from smallfirst.inference.models import bundled_embedding_model_path

    model_path = bundled_embedding_model_path()
    # The offline engine in a child process, so that it is completely gone before the stack starts.
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=offline_embed, args=(texts, str(model_path), results))
    child.start()
    offline_per_s = float(results.get(timeout=900))
    child.join(timeout=120)
    print(f"offline vLLM embed: {offline_per_s:.1f} texts/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        labels = workdir / "labels.csv"
        with labels.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        config = StackConfig(workdir=workdir, catalog_path=default_catalog_path(),
                             frontier_sim_args=["--strategy", "oracle", "--labels", str(labels)])
        stack = Stack(config)
        try:
            stack.start_all(embed_model=model_path)
            figures = run_pipeline(stack, rows, args.batch)
        finally:
            stack.stop_all()
    figures["offline_embed_texts_per_s"] = round(offline_per_s, 2)
    figures["pipeline_vs_offline"] = round(figures["pipeline_jobs_per_s"] / offline_per_s, 4)
    print(f"pipeline: {figures['pipeline_jobs_per_s']} classify jobs/s "
          f"({figures['pipeline_vs_offline']:.3f}x offline embedding); accuracy {figures['accuracy']:.3f} "
          f"with {figures['frontier_share']:.1%} sent to the frontier", flush=True)
    print(json.dumps({"bench": "pipeline_classify", **figures}))


if __name__ == "__main__":
    main()

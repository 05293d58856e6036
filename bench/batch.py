"""Cost and wall time of low-priority frontier jobs: realtime Messages calls against Message Batches.

    .venv/bin/python bench/batch.py [--jobs 1000] [--batch-processing-s 3] [--failed-rate 0.02]

In one run on the same machine, one stack (Redis, the frontier simulator, the API, one frontier
worker pool):
- baseline: `--jobs` low-priority `email_summary` jobs with `frontier_mode: realtime`: one Messages
  call each (the simulator answers after `--realtime-latency-ms`), at the list price.
- batch: the same number of jobs (same texts) with `frontier_mode: auto`, which sends `low` priority
  to Message Batches: billed at the batch price (the price file's factor, 0.5); the simulator answers
  `--failed-rate` of batched requests `errored` and as many `expired`, which are retried in later
  batches (their retries are the extra cost over 0.5).
Each phase is timed from the first submission to the last job's end. The simulator's batch
processing delay is short (seconds, where the real API takes minutes to hours): `batch_s` measures
the system's overhead around batches, not the provider's batch window.

The last line printed is one JSON object: cost_ratio (batch / realtime), realtime_s, batch_s,
jobs_ended, and the figures behind them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import TenantRegistry

TASK = "email_summary"
SUBMIT_CHUNK = 500


def texts(count: int) -> list[str]:
    return [f"Hi team, order {n} arrived damaged. Could you send a replacement by Friday? Thanks, Anna"
            for n in range(count)]


def run_phase(api_url: str, api_key: str, bodies: list[dict[str, Any]],
              timeout_s: float) -> tuple[float, dict[str, Any]]:
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=120) as http:
        started = time.monotonic()
        for start in range(0, len(bodies), SUBMIT_CHUNK):
            response = http.post("/v1/jobs/batch", json={"jobs": bodies[start:start + SUBMIT_CHUNK]})
            response.raise_for_status()
        deadline = started + timeout_s
        while True:
            totals: dict[str, Any] = http.get("/v1/stats").json()["totals"]
            if totals["jobs_ended"] >= len(bodies) or time.monotonic() > deadline:
                return time.monotonic() - started, totals
            time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch-processing-s", type=float, default=3.0)
    parser.add_argument("--failed-rate", type=float, default=0.02,
                        help="share of batched requests answered errored, and again expired")
    parser.add_argument("--realtime-latency-ms", type=int, default=500,
                        help="the simulator's latency of one Messages call (a short answer of a small model)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--timeout-s", type=float, default=600)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="smallfirst-bench-batch-"))
    stack = Stack(StackConfig(workdir=workdir, catalog_path=default_catalog_path(),
                              frontier_concurrency=args.concurrency, extra_env={
                                  "SMALLFIRST_FRONTIER_SIM_BATCH_PROCESSING_S": str(args.batch_processing_s),
                                  "SMALLFIRST_FRONTIER_SIM_BATCH_ERRORED_RATE": str(args.failed_rate),
                                  "SMALLFIRST_FRONTIER_SIM_BATCH_EXPIRED_RATE": str(args.failed_rate),
                                  "SMALLFIRST_FRONTIER_SIM_LATENCY_MS": str(args.realtime_latency_ms),
                                  "SMALLFIRST_FRONTIER_SIM_LOG_LEVEL": "warning",
                                  "SMALLFIRST_FRONTIER_BATCH_MAX_REQUESTS": "500",
                                  "SMALLFIRST_FRONTIER_BATCH_MAX_AGE_S": "1.0",
                                  "SMALLFIRST_FRONTIER_BATCH_POLL_INTERVAL_S": "0.5",
                                  "SMALLFIRST_FRONTIER_BATCH_MIN_TIME_LEFT_S": "0",
                                  "SMALLFIRST_FRONTIER_BATCH_MAX_TRIES": "3",
                                  "SMALLFIRST_LOG_LEVEL": "WARNING"}))
    try:
        stack.start_redis()
        stack.start_frontier_sim()
        stack.start_api()
        stack.start_worker(k.POOL_FRONTIER)
        registry = TenantRegistry(redis.Redis.from_url(stack.redis_url))
        inputs = texts(args.jobs)
        realtime_tenant = registry.create("bench-realtime")
        batch_tenant = registry.create("bench-batch")
        realtime_s, realtime = run_phase(stack.api_url, realtime_tenant.api_key, [
            {"task": TASK, "input": {"text": t}, "priority": "low", "frontier_mode": "realtime"} for t in inputs],
            args.timeout_s)
        batch_s, batch = run_phase(stack.api_url, batch_tenant.api_key, [
            {"task": TASK, "input": {"text": t}, "priority": "low", "frontier_mode": "auto"} for t in inputs],
            args.timeout_s)
        assert stack.frontier_base_url is not None
        sim_batches: dict[str, Any] = httpx.get(f"{stack.frontier_base_url}/_sim/stats",
                                                params={"log": "false"}).json()["batches"]
    finally:
        stack.stop_all()

    cost_ratio = batch["cost_usd"] / realtime["cost_usd"] if realtime["cost_usd"] else None
    retried = sim_batches["results_by_type"].get("errored", 0) + sim_batches["results_by_type"].get("expired", 0)
    print(f"realtime: {realtime['jobs_ended']} jobs ended in {realtime_s:.1f} s, cost ${realtime['cost_usd']:.4f}")
    print(f"batch:    {batch['jobs_ended']} jobs ended in {batch_s:.1f} s, cost ${batch['cost_usd']:.4f} "
          f"(saved by batching ${batch['batch_savings_usd']:.4f}); {sim_batches['created']} batches, "
          f"{retried} errored/expired requests retried")
    print(f"cost ratio batch/realtime: {cost_ratio:.3f} (target <= 0.5 plus the retries' share; "
          f"wall time ratio {batch_s / realtime_s:.2f} with a {args.batch_processing_s} s simulated batch window)")
    print(json.dumps({
        "cost_ratio": round(cost_ratio, 4) if cost_ratio is not None else None,
        "realtime_s": round(realtime_s, 2),
        "batch_s": round(batch_s, 2),
        "jobs_ended": int(realtime["jobs_ended"] + batch["jobs_ended"]),
        "jobs_per_phase": args.jobs,
        "realtime_cost_usd": round(realtime["cost_usd"], 6),
        "batch_cost_usd": round(batch["cost_usd"], 6),
        "batch_savings_usd": round(batch["batch_savings_usd"], 6),
        "batch_succeeded": batch["by_status"]["succeeded"],
        "realtime_succeeded": realtime["by_status"]["succeeded"],
        "batches_created": sim_batches["created"],
        "batched_requests": sim_batches["requests_total"],
        "retried_requests": retried,
        "sent_twice": len(sim_batches["custom_ids_sent_more_than_once"]),
        "batch_processing_s": args.batch_processing_s,
    }))


if __name__ == "__main__":
    main()

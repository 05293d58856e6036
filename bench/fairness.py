"""Fair scheduling across tenants: tenant B's wait (submit to start) while tenant A's 20,000 queued
jobs wait in the same tier and priority, next to B's wait with A absent, in the same run.

    .venv/bin/python bench/fairness.py [--a-jobs 20000] [--a-batch 1000] [--b-jobs 50] [--b-gap-s 0.1]
                                       [--job-ms 200] [--concurrency 8]

It starts the real stack (`smallfirst.cli.stack`): redis-server, the frontier simulator (answering
after `--job-ms`, so a job has a known, CPU-free length), the API and the frontier pool with
`--concurrency` threads; the jobs are frontier-routed (`email_summary` with `tier: frontier`), so no
vLLM is needed and the figures do not depend on the machine's CPU. The frontier queue is fed by
its fair dispatcher as in production.

1. Unloaded: B submits `--b-jobs` single jobs, one every `--b-gap-s`; each wait is the job's first
   attempt's `started_at` minus its `created_at`, read from the job record once every B job has
   started.
2. Loaded: A submits `--a-jobs` jobs in batches of `--a-batch` (`POST /v1/jobs/batch`); then B
   submits its single jobs the same way while A's backlog is still large. The run stops once B's
   jobs have all started (A's backlog is left; the stack is torn down).

Target (issue 15): B's p95 within 2x its unloaded p95 plus the time of one job (each worker
thread may be running, or be about to start, one of A's jobs when B's arrives: B's job starts no
later than the next job end of the pool, and with DRR at most one of A's entries is taken before
it). `job_s` is the median attempt length of B's unloaded jobs. The last line printed is one
JSON object: `b_p50_s`, `b_p95_s`, `b_unloaded_p50_s`, `b_unloaded_p95_s`, `p95_ratio`, and
`target_p95_s`, `within_target`, `a_backlog_after`, `a_started_during_b`, `job_s`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.jobs import Job
from smallfirst.common.tenants import TenantRegistry

TASK = "email_summary"
TEXT = "Hi team, can we move Thursday's review to Friday at 10? The slides are not ready. Thanks, Kim"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def job_body() -> dict[str, Any]:
    return {"task": TASK, "input": {"text": TEXT}, "tier": "frontier"}


class Tenant:
    def __init__(self, stack: Stack, client: redis.Redis, name: str) -> None:
        # No submission rate limit in the way: the bench measures scheduling, not admission.
        issued = TenantRegistry(client).create(name, tenant_id=name, limits={
            "quota_submissions_per_s": 1_000_000.0, "quota_submissions_burst": 1_000_000})
        self.http = httpx.Client(base_url=stack.api_url, timeout=120,
                                 headers={"Authorization": f"Bearer {issued.api_key}"})

    def submit_singles(self, count: int, gap_s: float) -> list[str]:
        ids: list[str] = []
        first = time.perf_counter()
        for i in range(count):
            pause = first + i * gap_s - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            response = self.http.post("/v1/jobs", json=job_body())
            response.raise_for_status()
            ids.append(response.json()["id"])
        return ids

    def submit_batches(self, count: int, batch: int) -> list[str]:
        ids: list[str] = []
        for start in range(0, count, batch):
            body = {"jobs": [job_body() for _ in range(min(batch, count - start))]}
            response = self.http.post("/v1/jobs/batch", json=body)
            response.raise_for_status()
            ids += [item["job"]["id"] for item in response.json()["results"]]
        return ids


def jobs_of(client: redis.Redis, ids: list[str]) -> list[Job]:
    raws = client.mget([k.job_key(i) for i in ids])
    return [Job.model_validate_json(raw) for raw in raws if raw is not None]


def wait_started(client: redis.Redis, ids: list[str], timeout_s: float) -> list[Job]:
    """The jobs once each has begun its first attempt."""
    deadline = time.monotonic() + timeout_s
    while True:
        jobs = jobs_of(client, ids)
        if len(jobs) == len(ids) and all(job.attempts for job in jobs):
            return jobs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{sum(1 for j in jobs if j.attempts)} of {len(ids)} jobs started in {timeout_s} s")
        time.sleep(0.1)


def waits_s(jobs: list[Job]) -> list[float]:
    return [job.attempts[0].started_at - job.created_at for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-jobs", type=int, default=20_000)
    parser.add_argument("--a-batch", type=int, default=1000)
    parser.add_argument("--b-jobs", type=int, default=50)
    parser.add_argument("--b-gap-s", type=float, default=0.1)
    parser.add_argument("--job-ms", type=int, default=200, help="the frontier simulator's answer delay")
    parser.add_argument("--concurrency", type=int, default=8, help="frontier pool threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(StackConfig(workdir=Path(tmp), catalog_path=default_catalog_path(),
                                  frontier_sim_args=["--latency-ms", str(args.job_ms)],
                                  frontier_concurrency=args.concurrency, extra_env={"SMALLFIRST_LOG_JSON": "false"}))
        try:
            stack.start_redis()
            stack.start_frontier_sim()
            stack.start_api()
            stack.start_worker(k.POOL_FRONTIER)
            client = redis.Redis.from_url(stack.redis_url)
            a, b = Tenant(stack, client, "tenant-a"), Tenant(stack, client, "tenant-b")
            wait_started(client, b.submit_singles(3, args.b_gap_s), 120)  # warm the path

            # 1. B alone
            unloaded = wait_started(client, b.submit_singles(args.b_jobs, args.b_gap_s), 300)
            time.sleep(2 * args.job_ms / 1000)
            unloaded_waits = waits_s(unloaded)
            lengths = [j.attempts[0].ended_at - j.attempts[0].started_at
                       for j in jobs_of(client, [j.id for j in unloaded]) if j.attempts[0].ended_at is not None]
            job_s = statistics.median(lengths) if lengths else args.job_ms / 1000
            print(f"unloaded: B p50 {percentile(unloaded_waits, 50):.3f} s, p95 {percentile(unloaded_waits, 95):.3f} s;"
                  f" job length {job_s:.3f} s", flush=True)

            # 2. A's batch, then B
            started = time.perf_counter()
            a_ids = a.submit_batches(args.a_jobs, args.a_batch)
            print(f"A submitted {len(a_ids)} jobs in {time.perf_counter() - started:.1f} s; "
                  f"backlog {client.llen(k.fair_backlog_key(k.QUEUE_FRONTIER))}", flush=True)
            a_before = int(client.hget(k.stats_key("tenant-a", TASK), "jobs_ended") or 0)
            loaded = wait_started(client, b.submit_singles(args.b_jobs, args.b_gap_s), 600)
            a_after = int(client.hget(k.stats_key("tenant-a", TASK), "jobs_ended") or 0)
            backlog = int(client.llen(k.fair_backlog_key(k.QUEUE_FRONTIER)))
            loaded_waits = waits_s(loaded)
            client.close()
        finally:
            stack.stop_all()

    figures = {
        "b_p50_s": round(percentile(loaded_waits, 50), 4),
        "b_p95_s": round(percentile(loaded_waits, 95), 4),
        "b_unloaded_p50_s": round(percentile(unloaded_waits, 50), 4),
        "b_unloaded_p95_s": round(percentile(unloaded_waits, 95), 4),
    }
    figures["p95_ratio"] = round(figures["b_p95_s"] / max(figures["b_unloaded_p95_s"], 1e-6), 2)
    target = 2 * figures["b_unloaded_p95_s"] + job_s
    figures.update({"target_p95_s": round(target, 4), "within_target": figures["b_p95_s"] <= target,
                    "job_s": round(job_s, 4), "a_jobs": len(a_ids), "a_backlog_after": backlog,
                    "a_ended_during_b": a_after - a_before, "b_jobs": args.b_jobs,
                    "concurrency": args.concurrency})
    print(f"B with A's {len(a_ids)} jobs queued: p50 {figures['b_p50_s']:.3f} s, p95 {figures['b_p95_s']:.3f} s "
          f"(alone: p50 {figures['b_unloaded_p50_s']:.3f} s, p95 {figures['b_unloaded_p95_s']:.3f} s); "
          f"A's backlog left {backlog}", flush=True)
    print(f"p95 ratio {figures['p95_ratio']}x; target p95 <= 2 x unloaded p95 + one job = {target:.3f} s: "
          f"{'met' if figures['within_target'] else 'NOT met'}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()

"""Ingest throughput: jobs per second accepted through the API, single and batch, next to raw
Celery `apply_async` from one process, all measured in the same run on the same Redis.

    .venv/bin/python bench/ingest.py [--jobs 3000] [--clients 32] [--api-workers 2] [--redis-url URL]

Without --redis-url (or REDIS_URL) it starts its own redis-server (AOF on, as in production).
The last line printed is one JSON object with the figures and the ratios (target: single submit
at least 0.5x raw apply_async, batch at least 2x).

What is measured:
- raw_apply_async: one process calling `apply_async` on the small-tier task of the project's own
  Celery app (`make_celery`), one message per call: the floor cost of queueing a job with Celery.
- api_single: `--clients` concurrent HTTP clients, each POSTing one job at a time to /v1/jobs;
  a job counts once the API answered 202 (authenticated, validated, routed, stored with its
  index and stats, published to the broker).
- api_batch: `--batch-clients` concurrent clients POSTing /v1/jobs/batch with `--batch-size` jobs.
After each API phase the bench checks that every accepted job has its message in the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.tenants import TenantRegistry

JOB = {"task": "banking77_intent", "input": {"text": "I am still waiting on my card, when will it arrive?"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed; pass --redis-url")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sf-bench-redis-") as workdir:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", workdir, "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            wait_for(lambda: _pings(url), 15, "redis-server")
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def queued_messages(client: redis.Redis) -> int:
    return sum(int(client.llen(key)) for key in k.priority_list_keys(k.QUEUE_SMALL))


def reset(client: redis.Redis) -> None:
    """Empty the queues and job records between phases. The tenant stays, and so do kombu's
    binding keys: deleting those under a running publisher would make its messages undeliverable."""
    doomed = [*k.priority_list_keys(k.QUEUE_SMALL), k.ACTIVE_JOBS_KEY]
    for pattern in (k.job_key("*"), k.tenant_jobs_key("*"), k.stats_key("*", "*"), k.quota_key("*", 0)[:-1] + "*"):
        doomed.extend(key.decode() for key in client.scan_iter(match=pattern, count=1000))
    for start in range(0, len(doomed), 1000):
        client.delete(*doomed[start:start + 1000])


def measure_apply_async(redis_url: str, jobs: int) -> float:
    settings = CoreSettings(redis_url=redis_url, catalog_path=default_catalog_path())
    app = make_celery(settings)

    @app.task(name=k.TASK_RUN_SMALL)
    def run_small(job_id: str) -> None:  # never executed here: only published
        raise RuntimeError("the bench publishes only")

    run_small.apply_async(args=["warm-up"], queue=k.QUEUE_SMALL, priority=k.PRIORITY_NORMAL)
    started = time.perf_counter()
    for i in range(jobs):
        run_small.apply_async(args=[f"job_{i}"], queue=k.QUEUE_SMALL, priority=k.PRIORITY_NORMAL)
    elapsed = time.perf_counter() - started
    app.close()
    return jobs / elapsed


@contextmanager
def api_process(redis_url: str, workers: int, logs: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(default_catalog_path()),
           "SMALLFIRST_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}
    log = logs.open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "smallfirst.cli", "api", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc), 60, "the API")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _ready(url: str, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise RuntimeError("the API exited during start-up; see its log")
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


async def _drive(url: str, api_key: str, clients: int, requests: int, path: str, body: dict[str, Any],
                 jobs_per_request: int) -> tuple[float, int, dict[int, int]]:
    """`requests` POSTs from `clients` concurrent connections; returns (seconds, jobs accepted, statuses).

    aiohttp rather than httpx: on two cores httpx's client used more CPU than the server it measured."""
    remaining = requests
    statuses: dict[int, int] = {}
    accepted = 0
    payload = json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(url, headers=headers, connector=connector, timeout=timeout) as session:
        async def worker() -> None:
            nonlocal remaining, accepted
            while remaining > 0:
                remaining -= 1
                async with session.post(path, data=payload) as response:
                    content = await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1
                if response.status == 202:
                    accepted += jobs_per_request if jobs_per_request == 1 else json.loads(content)["accepted"]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, accepted, statuses


def run_phase(url: str, api_key: str, client: redis.Redis, *, clients: int, requests: int, path: str,
              body: dict[str, Any], jobs_per_request: int) -> dict[str, Any]:
    reset(client)
    elapsed, accepted, statuses = asyncio.run(_drive(url, api_key, clients, requests, path, body,
                                                     jobs_per_request))
    queued = queued_messages(client)
    return {"jobs_per_s": accepted / elapsed, "accepted": accepted, "seconds": elapsed, "statuses": statuses,
            "queued_messages": queued, "all_accepted_queued": queued == accepted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per single-submit round and for apply_async")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients for single submits")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-requests", type=int, default=40)
    parser.add_argument("--batch-clients", type=int, default=8,
                        help="concurrent batch clients (enough that every API worker gets connections)")
    parser.add_argument("--api-workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--rounds", type=int, default=3,
                        help="each figure is the median of this many rounds (raw, single and batch interleaved)")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "smallfirst-bench-api.log")
    args = parser.parse_args()

    raw_rates: list[float] = []
    singles: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    batch_body = {"jobs": [JOB] * args.batch_size}
    with redis_server(args.redis_url) as redis_url:
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        api_key = TenantRegistry(client).create("bench").api_key
        with api_process(redis_url, args.api_workers, args.log) as url:
            # Warm-up: imports, connection pools, the catalog and tenant caches of every worker.
            asyncio.run(_drive(url, api_key, args.clients, min(500, args.jobs), "/v1/jobs", JOB, 1))
            asyncio.run(_drive(url, api_key, args.batch_clients, args.batch_clients, "/v1/jobs/batch", batch_body,
                               args.batch_size))
            for round_number in range(1, args.rounds + 1):
                reset(client)
                raw_rates.append(measure_apply_async(redis_url, args.jobs))
                singles.append(run_phase(url, api_key, client, clients=args.clients, requests=args.jobs,
                                         path="/v1/jobs", body=JOB, jobs_per_request=1))
                batches.append(run_phase(url, api_key, client, clients=args.batch_clients,
                                         requests=args.batch_requests, path="/v1/jobs/batch", body=batch_body,
                                         jobs_per_request=args.batch_size))
                print(f"round {round_number}: raw apply_async {raw_rates[-1]:7.0f} jobs/s | "
                      f"POST /v1/jobs ({args.clients} clients) {singles[-1]['jobs_per_s']:7.0f} jobs/s | "
                      f"POST /v1/jobs/batch ({args.batch_size}/request, {args.batch_clients} clients) "
                      f"{batches[-1]['jobs_per_s']:7.0f} jobs/s", flush=True)
        reset(client)
        client.close()

    raw = statistics.median(raw_rates)
    single = statistics.median(r["jobs_per_s"] for r in singles)
    batch = statistics.median(r["jobs_per_s"] for r in batches)
    result = {
        "bench": "ingest",
        "cpu_count": os.cpu_count(),
        "api_workers": args.api_workers,
        "rounds": args.rounds,
        "raw_apply_async_jobs_per_s": round(raw, 1),
        "api_single_jobs_per_s": round(single, 1),
        "api_batch_jobs_per_s": round(batch, 1),
        "single_vs_apply_async": round(single / raw, 3),
        "batch_vs_apply_async": round(batch / raw, 3),
        "target_single_vs_apply_async": 0.5,
        "target_batch_vs_apply_async": 2.0,
        "samples": {
            "raw_apply_async": [round(r, 1) for r in raw_rates],
            "api_single": [round(r["jobs_per_s"], 1) for r in singles],
            "api_batch": [round(r["jobs_per_s"], 1) for r in batches],
        },
        "api_single_clients": args.clients,
        "api_single_jobs_per_round": args.jobs,
        "api_batch_size": args.batch_size,
        "api_batch_clients": args.batch_clients,
        "api_batch_jobs_per_round": args.batch_size * args.batch_requests,
        "all_accepted_jobs_queued": all(r["all_accepted_queued"] for r in [*singles, *batches]),
        "non_202_responses": sum(n for r in [*singles, *batches] for s, n in r["statuses"].items() if s != 202),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

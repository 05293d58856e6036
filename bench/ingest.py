"""Ingest throughput: jobs per second accepted through the API, single and batch, next to raw
Celery `apply_async` from one process, all measured in the same run on the same Redis; and the
same API with tracing on, exporting every span to an OTLP receiver, against tracing off.

    .venv/bin/python bench/ingest.py [--jobs 3000] [--clients 32] [--api-workers 2] [--redis-url URL]
                                     [--no-tracing | --trace-sample-ratio 0.1]

Without --redis-url (or REDIS_URL) it starts its own redis-server (AOF on, as in production).
The last line printed is one JSON object with the figures and the ratios (target: single submit
at least 0.5x raw apply_async, batch at least 2x; `tracing_single_vs_off` and
`tracing_batch_vs_off`: throughput with tracing on as a fraction of tracing off, the median over
rounds of each round's traced phase against the untraced phase run just before it).

What is measured:
- raw_apply_async: one process calling `apply_async` on the small-tier task of the project's own
  Celery app (`make_celery`), one message per call: the floor cost of queueing a job with Celery.
- api_single: `--clients` concurrent HTTP clients, each POSTing one job at a time to /v1/jobs;
  a job counts once the API answered 202 (authenticated, validated, routed, stored with its
  index and stats, published to the broker).
- api_batch: `--batch-clients` concurrent clients POSTing /v1/jobs/batch with `--batch-size` jobs.
- api_single_traced / api_batch_traced: the same two phases against a second API process (same
  settings) started with `OTEL_TRACES_EXPORTER=otlp`, every request sampled (or the share given by
  `--trace-sample-ratio`), exporting over OTLP/HTTP with the SDK's default batch processor to a
  receiver process (`python -m tests.support.otlp_receiver`, which decodes and counts what
  arrives, as a collector would). Both API processes run for the whole bench and their phases are interleaved round by
  round, so both see the same Redis and the same machine. The receiver shares the machine's cores:
  its CPU is part of the cost measured, as for a collector agent on the same node.
- api_single_fsync_always / api_batch_fsync_always: the same two phases against a third API process
  whose own redis-server runs with `appendfsync always` (fsync before every reply) instead of
  `everysec`, phases paired round by round as for tracing (`--no-fsync-compare` skips them; they are
  skipped with --redis-url, whose fsync setting is not the bench's to choose). `always` makes every
  acknowledged write survive a machine crash; `everysec` loses up to about a second of them then
  (a killed redis-server process alone loses nothing, see README "Redis").
After each API phase the bench checks that every accepted job has its message in the queue.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import redis

from smallfirst.cli.stack import RedisServer, free_port
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.tenants import TenantRegistry

JOB = {"task": "banking77_intent", "input": {"text": "I am still waiting on my card, when will it arrive?"}}
REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_for(condition: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


@contextmanager
def redis_server(url: str | None, appendfsync: str = "everysec") -> Iterator[str]:
    if url:
        yield url
        return
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is not installed; pass --redis-url")
    with tempfile.TemporaryDirectory(prefix="sf-bench-redis-") as workdir:
        server = RedisServer(Path(workdir), appendfsync=appendfsync).start()
        try:
            yield server.url
        finally:
            server.stop()


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def queued_messages(client: redis.Redis) -> int:
    """Jobs waiting for the small pool: its Celery lists and, with fair scheduling, its fair backlog
    (no worker runs here, so nothing dispatches them)."""
    return sum(int(client.llen(key)) for key in k.queue_backlog_keys(k.QUEUE_SMALL))


def reset(client: redis.Redis) -> None:
    """Empty the queues and job records between phases. The tenant stays, and so do kombu's
    binding keys: deleting those under a running publisher would make its messages undeliverable."""
    doomed = [*k.priority_list_keys(k.QUEUE_SMALL), k.ACTIVE_JOBS_KEY, k.PUBLISH_OUTBOX_KEY]
    for pattern in (k.job_key("*"), k.tenant_jobs_key("*"), k.stats_key("*", "*"), k.quota_key("*", 0)[:-1] + "*",
                    k.fair_base_key(k.QUEUE_SMALL) + "*"):
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


@dataclass
class Receiver:
    """An OTLP receiver process; `stats` is filled in once it has stopped."""

    http_endpoint: str
    stats: dict[str, int] = field(default_factory=dict)

    def env(self, sample_ratio: float = 1.0) -> dict[str, str]:
        # Only what selects the exporter (and the sampler): the batch processor keeps the SDK's defaults.
        env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
               "OTEL_EXPORTER_OTLP_ENDPOINT": self.http_endpoint}
        if sample_ratio < 1.0:
            env.update({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": str(sample_ratio)})
        return env


@contextmanager
def otlp_receiver_process() -> Iterator[Receiver]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.otlp_receiver"], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    if not first:
        proc.wait()
        raise RuntimeError("the OTLP receiver exited during start-up")
    receiver = Receiver(http_endpoint=json.loads(first)["http_endpoint"])
    try:
        yield receiver
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        lines = rest.strip().splitlines()
        if lines:
            receiver.stats = json.loads(lines[-1])


@contextmanager
def api_process(redis_url: str, workers: int, logs: Path, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    port = free_port()
    # Tracing only where extra_env asks for it, whatever this shell has set.
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    env = {**inherited, "SMALLFIRST_REDIS_URL": redis_url, "SMALLFIRST_CATALOG_PATH": str(default_catalog_path()),
           "SMALLFIRST_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
           # The bench measures the ingest path at full speed: one tenant, no effective submission rate limit.
           "SMALLFIRST_DEFAULT_SUBMISSIONS_PER_S": "1000000", "SMALLFIRST_DEFAULT_SUBMISSIONS_BURST": "1000000",
           # No worker ends these jobs, and the phases together queue more than the default limits.
           "SMALLFIRST_DEFAULT_MAX_JOBS_IN_FLIGHT": "100000000", "SMALLFIRST_DEFAULT_MAX_BYTES_STORED": str(64 << 30),
           **(extra_env or {})}
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


def _warm_up(url: str, api_key: str, args: argparse.Namespace, batch_body: dict[str, Any]) -> int:
    """Imports, connection pools, the catalog and tenant caches of every API worker; returns jobs accepted."""
    _, single, _ = asyncio.run(_drive(url, api_key, args.clients, min(500, args.jobs), "/v1/jobs", JOB, 1))
    _, batch, _ = asyncio.run(_drive(url, api_key, args.batch_clients, args.batch_clients, "/v1/jobs/batch",
                                     batch_body, args.batch_size))
    return single + batch


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
    parser.add_argument("--tracing", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure an API with tracing on, exporting to an OTLP receiver")
    parser.add_argument("--trace-sample-ratio", type=float, default=1.0,
                        help="share of requests the traced API samples (head sampling); 1: every request")
    parser.add_argument("--fsync-compare", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure an API on a redis-server with appendfsync always")
    parser.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "smallfirst-bench-api.log")
    args = parser.parse_args()

    raw_rates: list[float] = []
    singles: list[dict[str, Any]] = []
    batches: list[dict[str, Any]] = []
    traced_singles: list[dict[str, Any]] = []
    traced_batches: list[dict[str, Any]] = []
    always_singles: list[dict[str, Any]] = []
    always_batches: list[dict[str, Any]] = []
    traced_jobs = 0
    receiver: Receiver | None = None
    batch_body = {"jobs": [JOB] * args.batch_size}
    compare_fsync = args.fsync_compare and not args.redis_url
    with redis_server(args.redis_url) as redis_url, contextlib.ExitStack() as always_redis:
        client = redis.Redis.from_url(redis_url)
        client.flushdb()
        api_key = TenantRegistry(client).create("bench").api_key
        always_client: redis.Redis | None = None
        always_key = ""
        if compare_fsync:
            always_url = always_redis.enter_context(redis_server(None, appendfsync="always"))
            always_client = redis.Redis.from_url(always_url)
            always_key = TenantRegistry(always_client).create("bench").api_key
        with contextlib.ExitStack() as running:
            url = running.enter_context(api_process(redis_url, args.api_workers, args.log))
            fsync_url: str | None = None
            if always_client is not None:
                fsync_url = running.enter_context(api_process(
                    always_url, args.api_workers, args.log.with_name(f"{args.log.stem}-fsync{args.log.suffix}")))
            traced_url: str | None = None
            if args.tracing:
                receiver = running.enter_context(otlp_receiver_process())
                # Entered last, so stopped first: it flushes its spans on exit, while the receiver still runs.
                traced_url = running.enter_context(api_process(
                    redis_url, args.api_workers, args.log.with_name(f"{args.log.stem}-traced{args.log.suffix}"),
                    receiver.env(args.trace_sample_ratio)))
            _warm_up(url, api_key, args, batch_body)
            if fsync_url is not None:
                _warm_up(fsync_url, always_key, args, batch_body)
            if traced_url is not None:
                traced_jobs += _warm_up(traced_url, api_key, args, batch_body)
            for round_number in range(1, args.rounds + 1):
                reset(client)
                raw_rates.append(measure_apply_async(redis_url, args.jobs))
                # Each traced phase right after its untraced twin, so that the pair sees about the same
                # load from whatever else runs on the machine.
                singles.append(run_phase(url, api_key, client, clients=args.clients, requests=args.jobs,
                                         path="/v1/jobs", body=JOB, jobs_per_request=1))
                if fsync_url is not None and always_client is not None:
                    always_singles.append(run_phase(fsync_url, always_key, always_client, clients=args.clients,
                                                    requests=args.jobs, path="/v1/jobs", body=JOB,
                                                    jobs_per_request=1))
                if traced_url is not None:
                    traced_singles.append(run_phase(traced_url, api_key, client, clients=args.clients,
                                                    requests=args.jobs, path="/v1/jobs", body=JOB,
                                                    jobs_per_request=1))
                batches.append(run_phase(url, api_key, client, clients=args.batch_clients,
                                         requests=args.batch_requests, path="/v1/jobs/batch", body=batch_body,
                                         jobs_per_request=args.batch_size))
                if fsync_url is not None and always_client is not None:
                    always_batches.append(run_phase(fsync_url, always_key, always_client,
                                                    clients=args.batch_clients, requests=args.batch_requests,
                                                    path="/v1/jobs/batch", body=batch_body,
                                                    jobs_per_request=args.batch_size))
                if traced_url is not None:
                    traced_batches.append(run_phase(traced_url, api_key, client, clients=args.batch_clients,
                                                    requests=args.batch_requests, path="/v1/jobs/batch",
                                                    body=batch_body, jobs_per_request=args.batch_size))
                line = (f"round {round_number}: raw apply_async {raw_rates[-1]:7.0f} jobs/s | "
                        f"POST /v1/jobs ({args.clients} clients) {singles[-1]['jobs_per_s']:7.0f} jobs/s | "
                        f"POST /v1/jobs/batch ({args.batch_size}/request, {args.batch_clients} clients) "
                        f"{batches[-1]['jobs_per_s']:7.0f} jobs/s")
                if fsync_url is not None:
                    line += (f" | fsync always: single {always_singles[-1]['jobs_per_s']:7.0f} jobs/s, "
                             f"batch {always_batches[-1]['jobs_per_s']:7.0f} jobs/s")
                if traced_url is not None:
                    traced_jobs += traced_singles[-1]["accepted"] + traced_batches[-1]["accepted"]
                    line += (f" | traced: single {traced_singles[-1]['jobs_per_s']:7.0f} jobs/s, "
                             f"batch {traced_batches[-1]['jobs_per_s']:7.0f} jobs/s")
                print(line, flush=True)
        reset(client)
        client.close()
        if always_client is not None:
            reset(always_client)
            always_client.close()

    raw = statistics.median(raw_rates)
    single = statistics.median(r["jobs_per_s"] for r in singles)
    batch = statistics.median(r["jobs_per_s"] for r in batches)
    phases = [*singles, *batches, *traced_singles, *traced_batches, *always_singles, *always_batches]
    result: dict[str, Any] = {
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
        "all_accepted_jobs_queued": all(r["all_accepted_queued"] for r in phases),
        "non_202_responses": sum(n for r in phases for s, n in r["statuses"].items() if s != 202),
    }
    if always_singles:
        # Paired per round, like tracing: the always phase against the everysec phase just before it.
        fsync_single = [a["jobs_per_s"] / o["jobs_per_s"] for a, o in zip(always_singles, singles, strict=True)]
        fsync_batch = [a["jobs_per_s"] / o["jobs_per_s"] for a, o in zip(always_batches, batches, strict=True)]
        result["samples"].update({
            "api_single_fsync_always": [round(r["jobs_per_s"], 1) for r in always_singles],
            "api_batch_fsync_always": [round(r["jobs_per_s"], 1) for r in always_batches],
        })
        result.update({
            "redis_appendfsync": "everysec",
            "api_single_fsync_always_jobs_per_s": round(statistics.median(r["jobs_per_s"] for r in always_singles), 1),
            "api_batch_fsync_always_jobs_per_s": round(statistics.median(r["jobs_per_s"] for r in always_batches), 1),
            "fsync_always_single_vs_everysec": round(statistics.median(fsync_single), 3),
            "fsync_always_batch_vs_everysec": round(statistics.median(fsync_batch), 3),
        })
    if receiver is not None:
        traced_single = statistics.median(r["jobs_per_s"] for r in traced_singles)
        traced_batch = statistics.median(r["jobs_per_s"] for r in traced_batches)
        spans = receiver.stats.get("spans", 0)
        result["samples"].update({
            "api_single_traced": [round(r["jobs_per_s"], 1) for r in traced_singles],
            "api_batch_traced": [round(r["jobs_per_s"], 1) for r in traced_batches],
        })
        # Paired per round (traced phase against the untraced phase of the same round), then the
        # median: drift in the machine's load between rounds cancels out of each pair.
        single_ratios = [t["jobs_per_s"] / o["jobs_per_s"] for t, o in zip(traced_singles, singles, strict=True)]
        batch_ratios = [t["jobs_per_s"] / o["jobs_per_s"] for t, o in zip(traced_batches, batches, strict=True)]
        result["samples"].update({
            "tracing_single_vs_off": [round(r, 3) for r in single_ratios],
            "tracing_batch_vs_off": [round(r, 3) for r in batch_ratios],
        })
        result.update({
            "api_single_traced_jobs_per_s": round(traced_single, 1),
            "api_batch_traced_jobs_per_s": round(traced_batch, 1),
            "tracing_single_vs_off": round(statistics.median(single_ratios), 3),
            "tracing_batch_vs_off": round(statistics.median(batch_ratios), 3),
            "tracing_exporter": "otlp http/protobuf, default batch span processor",
            "tracing_sample_ratio": args.trace_sample_ratio,
            "tracing_spans_received": spans,
            "tracing_export_requests": receiver.stats.get("requests", 0),
            "tracing_export_rejected": receiver.stats.get("rejected", 0),
            # Per job accepted by the traced API (a batch's jobs share their request's spans).
            "tracing_spans_per_traced_job": round(spans / traced_jobs, 3) if traced_jobs else None,
        })
    print(json.dumps(result))


if __name__ == "__main__":
    main()

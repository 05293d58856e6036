"""Whole-pipeline throughput, latency, Redis traffic and idle CPU of small-tier classify jobs.

    .venv/bin/python bench/pipeline.py [--jobs 1000] [--batch 100] [--rate 20] [--latency-jobs 200]

In one run on the same machine:
- baseline: vLLM offline in-process (`LLM.embed`) on the evaluation texts: the engine's best case.
  It runs first, in a child process that is gone before the stack starts, so they never share CPUs.
- the whole stack as separate processes (Redis, the API, the small, frontier and webhooks pools,
  the embedding and generator inference services, the frontier simulator), and on it:
  - idle CPU: every process of the stack, summed (percent of one core), while no job runs;
  - the bare Embed call: one text per call, straight to the inference service, p50 and p95;
  - throughput, jobs/s end to end (first submission through `POST /v1/jobs/batch` to the last
    job's end) of a 77-label task (Banking77's intents) and of a 308-label task (each intent
    split into four paraphrase groups, 2,772 label texts), each as a ratio to the offline rate:
    after `--warm-jobs` untimed jobs, the median of `--rounds` timed runs (each run's figure is
    printed too: on two cores shared by every process, runs of the same stack differ by up to
    half);
  - latency: single jobs submitted at a steady rate (`POST /v1/jobs`, then a long-poll to the end),
    submit to result, p50 and p95, next to the bare Embed call's;
  - Redis commands per job (INFO commandstats before and after the steady run, all commands of
    every client, so background traffic over the run's duration is included), and per second idle;
    then Redis round trips per job (a transaction or a script call is one; MONITOR, over a steady
    run of half as many jobs, apart because MONITOR slows Redis), and the commands scripts ran;
  - throughput again with a second small-worker process.
The bench tasks keep every job on the small tier (no validator escalates it): the figures are the
small tier's. Accuracy is the intent's (a paraphrase group's answer counts for its intent).

`--base-only-redis`: only the stack's Redis commands per job and idle CPU, no vLLM offline run
(for a run on an older checkout, to compare).
`--only-latency`: only the steady-rate run and the bare Embed call (no vLLM offline run, no
throughput runs), for a quick look at latency; its JSON line carries the same latency figures.

The steady run also splits each job's submit-to-result time into stages, from the client's clock
and the job record's (one machine, one clock), p50 and p95 of each (`latency_stages_ms`): `accept`
(submit to the record's creation), `to_start` (creation to the attempt's start: the fair list, the
dispatcher, the Celery queue and prefetch), `attempt` (the attempt's start to its end: the embed
call and scoring), `to_end` (the attempt's end to the job's end), `to_client` (the job's end to the
long-poll's answer at the client).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import psutil
import redis
import yaml

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import TenantRegistry

if TYPE_CHECKING:
    from vllm.config.model import ModelDType

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
SEEDS_PER_INTENT = 10  # scripts/make_banking77_catalog.py
TASK_77 = "bench_intent_77"
TASK_308 = "bench_intent_308"
GROUPS_PER_INTENT = 4
EXAMPLES_PER_GROUP = 8
# The fine task's examples come from after the evaluation texts of each intent.
FINE_EXAMPLES_FROM = 40
TERMINAL = {"succeeded", "failed", "cancelled"}
IDLE_TRIPS_S = 3.0  # idle time under MONITOR before the round-trip run, for the background traffic


def intents(dataset: Path) -> dict[str, list[str]]:
    per_intent: dict[str, list[str]] = defaultdict(list)
    with dataset.open(newline="") as handle:
        for row in csv.DictReader(handle):
            per_intent[row["category"]].append(row["text"].strip())
    return per_intent


def evaluation_rows(per_intent: dict[str, list[str]], count: int) -> list[tuple[str, str]]:
    """Messages after each intent's seed examples, interleaved across intents."""
    held_out = {intent: texts[SEEDS_PER_INTENT:FINE_EXAMPLES_FROM] for intent, texts in per_intent.items()}
    rows: list[tuple[str, str]] = []
    depth = 0
    while len(rows) < count and any(depth < len(t) for t in held_out.values()):
        for intent, texts in held_out.items():
            if depth < len(texts) and len(rows) < count:
                rows.append((texts[depth], intent))
        depth += 1
    return rows


def bench_catalog(folder: Path, per_intent: dict[str, list[str]]) -> None:
    """The default catalog, plus the two bench tasks: Banking77's labels as the catalog has them, and
    each intent split into paraphrase groups of examples the evaluation does not use."""
    for source in default_catalog_path().glob("*.yaml"):
        shutil.copy(source, folder / source.name)
    banking = yaml.safe_load((default_catalog_path() / "banking77.yaml").read_text())
    base = next(task for task in banking["tasks"] if task["name"] == "banking77_intent")
    coarse = {**base, "name": TASK_77, "validators": [], "description": "Bench: 77 intents, small tier only."}
    fine_labels = []
    for label in base["labels"]:
        known = per_intent[label["name"]]
        pool = known[:SEEDS_PER_INTENT] + known[FINE_EXAMPLES_FROM:]
        for group in range(GROUPS_PER_INTENT):
            examples = pool[group::GROUPS_PER_INTENT][:EXAMPLES_PER_GROUP]
            fine_labels.append({"name": f"{label['name']}__{group + 1}",
                                "description": f"{label['description']} (paraphrase group {group + 1})",
                                "examples": examples})
    fine = {**coarse, "name": TASK_308, "labels": fine_labels,
            "description": f"Bench: {len(fine_labels)} paraphrase groups of 77 intents, small tier only."}
    (folder / "bench.yaml").write_text(yaml.safe_dump({
        "tasks": [coarse, fine],
        "defaults": banking.get("defaults", {}),
    }, sort_keys=False))


def offline_embed(texts: list[str], model_path: str, queue: Any) -> None:
    from vllm import LLM

    from smallfirst.inference.dtypes import platform_dtype

    # The same engine settings the inference service runs with (its default dtype, 1 GiB of KV
    # cache, eager mode).
    dtype = platform_dtype().dtype
    llm = LLM(model=model_path, runner="pooling", enforce_eager=True, dtype=cast("ModelDType", dtype),
              kv_cache_memory_bytes=2**30)
    llm.embed(texts[:64])  # warm-up
    started = time.perf_counter()
    llm.embed(texts)
    queue.put((len(texts) / (time.perf_counter() - started), dtype))
    del llm
    gc.collect()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---- measurements on the stack ----------------------------------------------------------------------
def stack_processes(stack: Stack) -> dict[str, list[psutil.Process]]:
    found: dict[str, list[psutil.Process]] = {}
    for name, component in stack.components.items():
        proc = getattr(component, "proc", None)
        if proc is None:
            continue
        try:
            root = psutil.Process(proc.pid)
            found[name] = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
    return found


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds (user and system) each component has used so far, its children included."""
    totals: dict[str, float] = {}
    for name, procs in processes.items():
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
        totals[name] = total
    return totals


def idle_cpu(stack: Stack, seconds: float) -> tuple[float, dict[str, float]]:
    """Percent of one core used by each component (with its children) over `seconds` of no work."""
    processes = stack_processes(stack)
    before, started = cpu_seconds(processes), time.perf_counter()
    time.sleep(seconds)
    after, elapsed = cpu_seconds(processes), time.perf_counter() - started
    per = {name: round(100 * (after[name] - before.get(name, after[name])) / elapsed, 2) for name in after}
    return round(sum(per.values()), 2), per


def redis_calls(client: redis.Redis) -> dict[str, int]:
    stats: Any = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before.get(name, 0) for name in after if after[name] - before.get(name, 0) > 0}


class RoundTrips:
    """Counts Redis round trips while it runs, from MONITOR: every command a client sends is one,
    except that a MULTI ... EXEC transaction is one in all; commands a script runs are counted
    apart (MONITOR shows them as the `lua` client's). A pipeline without a transaction would count
    once per command (the stack's clients send none on the job path). MONITOR slows Redis down,
    so this runs apart from the timed runs."""

    STOP = "smallfirst-bench-monitor-stop"

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.trips = 0
        self.script_commands = 0
        self.by_name: Counter[str] = Counter()  # round trips by their (first) command
        self._in_transaction: set[tuple[str, str]] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RoundTrips:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.echo(self.STOP)
        self._thread.join(30)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            self._ready.set()
            for command in monitor.listen():
                text = str(command["command"])
                if self.STOP in text:
                    return
                self._count(str(command.get("client_type")), (str(command.get("client_address")),
                                                              str(command.get("client_port"))), text)

    def _count(self, client_type: str, client: tuple[str, str], text: str) -> None:
        if client_type == "lua":
            self.script_commands += 1
            return
        name = text.split(" ", 1)[0].upper()
        if client in self._in_transaction:
            if name in ("EXEC", "DISCARD"):
                self._in_transaction.discard(client)
            return
        if name == "MULTI":
            self._in_transaction.add(client)
        self.trips += 1
        self.by_name[name] += 1


def bare_embed_latency_ms(stack: Stack, texts: list[str], count: int) -> list[float]:
    from smallfirst.small_worker.inference_client import InferenceClient

    latencies = []
    with InferenceClient({"all-minilm-l6-v2": f"127.0.0.1:{stack.ports['embed']}"}) as client:
        client.embed("all-minilm-l6-v2", texts[:1], truncate=True)
        for text in (texts * (count // max(1, len(texts)) + 1))[:count]:
            started = time.perf_counter()
            client.embed("all-minilm-l6-v2", [text], truncate=True)
            latencies.append((time.perf_counter() - started) * 1e3)
            time.sleep(0.02)
    return latencies


def job_stages(job: dict[str, Any], submitted_at: float, answered_at: float) -> dict[str, float]:
    """A single-attempt job's submit-to-result time in stages, ms (empty for any other job)."""
    attempts = job.get("attempts") or []
    if len(attempts) != 1 or attempts[0].get("ended_at") is None or job.get("ended_at") is None:
        return {}
    attempt = attempts[0]
    marks = [submitted_at, job["created_at"], attempt["started_at"], attempt["ended_at"], job["ended_at"], answered_at]
    names = ("accept", "to_start", "attempt", "to_end", "to_client")
    return {name: (marks[i + 1] - marks[i]) * 1e3 for i, name in enumerate(names)}


class Bench:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.redis = redis.Redis.from_url(stack.redis_url)
        # Above the default submission quota: the throughput rounds submit faster than a tenant may
        # by default (a refused item would be a job the round never ran).
        issued = TenantRegistry(self.redis).create("bench", limits={
            "quota_submissions_per_s": 100000.0, "quota_submissions_burst": 100000})
        self.tenant_id = issued.tenant.id
        self.headers = {"Authorization": f"Bearer {issued.api_key}"}

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.stack.api_url, headers=self.headers, timeout=120)

    def ended(self, task: str) -> int:
        raw = self.redis.hget(k.stats_key(self.tenant_id, task), "jobs_ended")
        return int(raw) if raw is not None else 0

    def warm(self, tasks: list[str], text: str) -> None:
        """One job per task, to its end: label indexes are built (or were, at the workers' start)."""
        with self.client() as client:
            for task in tasks:
                job = client.post("/v1/jobs", json={"task": task, "input": {"text": text}}).json()
                while client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()["status"] not in TERMINAL:
                    pass

    def throughput(self, task: str, rows: list[tuple[str, str]], batch: int) -> dict[str, Any]:
        """Jobs/s from the first submission to the last end (ends counted in the tenant's stats), and
        the CPU each component of the stack spent meanwhile, ms per job."""
        target = self.ended(task) + len(rows)
        ids: list[str] = []
        processes = stack_processes(self.stack)
        with self.client() as client:
            cpu_before = cpu_seconds(processes)
            started = time.perf_counter()
            for start in range(0, len(rows), batch):
                body = {"jobs": [{"task": task, "input": {"text": text}} for text, _ in rows[start:start + batch]]}
                response = client.post("/v1/jobs/batch", json=body)
                response.raise_for_status()
                for item in response.json()["results"]:
                    if item.get("job") is None:
                        raise RuntimeError(f"a bench job was refused: {item}")
                    ids.append(item["job"]["id"])
            deadline = time.monotonic() + 900
            while self.ended(task) < target and time.monotonic() < deadline:
                time.sleep(0.02)
            elapsed_s = time.perf_counter() - started
            cpu_after = cpu_seconds(processes)
            jobs = [client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json() for job_id in ids]
        correct = sum(1 for job, (_, intent) in zip(jobs, rows, strict=True)
                      if job["status"] == "succeeded" and str(job["result"]["label"]).split("__")[0] == intent)
        return {"jobs_per_s": round(len(rows) / elapsed_s, 2),
                "succeeded": sum(1 for job in jobs if job["status"] == "succeeded"),
                "accuracy": round(correct / len(rows), 4),
                "cpu_ms_per_job": {name: round(1e3 * (cpu_after[name] - cpu_before.get(name, cpu_after[name]))
                                               / len(rows), 2) for name in cpu_after}}

    def steady(self, task: str, texts: list[str], rate: float,
               count: int) -> tuple[list[float], dict[str, list[float]]]:
        """Single jobs at a steady rate, each submitted and long-polled on its own thread; the
        submit-to-result times, and each job's stages (see the module's docstring)."""
        latencies: list[float] = []
        stages: dict[str, list[float]] = defaultdict(list)
        lock = threading.Lock()
        client = httpx.Client(base_url=self.stack.api_url, headers=self.headers, timeout=120,
                              limits=httpx.Limits(max_connections=200, max_keepalive_connections=200))

        def one(text: str) -> None:
            started, submitted_at = time.perf_counter(), time.time()
            job = client.post("/v1/jobs", json={"task": task, "input": {"text": text}}).json()
            while job["status"] not in TERMINAL:
                job = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
            answered_at = time.time()
            with lock:
                latencies.append((time.perf_counter() - started) * 1e3)
                for name, value in job_stages(job, submitted_at, answered_at).items():
                    stages[name].append(value)

        threads = []
        first = time.perf_counter()
        for i in range(count):
            pause = first + i / rate - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            thread = threading.Thread(target=one, args=(texts[i % len(texts)],))
            thread.start()
            threads.append(thread)
        for thread in threads:
            thread.join()
        client.close()
        return latencies, stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="jobs/s of the latency run")
    parser.add_argument("--latency-jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="timed throughput runs per task (the median is reported)")
    parser.add_argument("--warm-jobs", type=int, default=300, help="untimed jobs before each task's timed runs")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--base-only-redis", action="store_true")
    parser.add_argument("--only-latency", action="store_true", help="only the steady run and the bare Embed call")
    parser.add_argument("--worker-counts", default="1,2",
                        help="small-worker processes of the throughput runs, comma-separated (a quick look: 1)")
    args = parser.parse_args()
    worker_counts = sorted({int(n) for n in args.worker_counts.split(",")})
    if not set(worker_counts) <= {1, 2}:
        parser.error(f"--worker-counts: 1, 2 or both, not {args.worker_counts}")
    per_intent = intents(args.dataset)
    rows = evaluation_rows(per_intent, args.jobs)
    texts = [text for text, _ in rows]

    from smallfirst.inference.models import bundled_embedding_model_path

    model_path = bundled_embedding_model_path()
    offline_per_s = 0.0
    figures: dict[str, Any] = {}
    if not (args.base_only_redis or args.only_latency):
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        child = context.Process(target=offline_embed, args=(texts, str(model_path), results))
        child.start()
        offline_per_s, dtype = results.get(timeout=900)
        child.join(timeout=120)
        figures["dtype"] = dtype
        print(f"offline vLLM embed ({dtype}): {offline_per_s:.1f} texts/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        catalog = workdir / "catalog"
        catalog.mkdir()
        bench_catalog(catalog, per_intent)
        generator = workdir / "tiny-generator"
        subprocess.run([sys.executable, "-m", "smallfirst.cli", "make-tiny-model", str(generator)], check=True,
                       capture_output=True)
        config = StackConfig(workdir=workdir, catalog_path=catalog)
        stack = Stack(config)
        try:
            stack.start_all(embed_model=model_path, generator_model=generator)
            bench = Bench(stack)
            bench.warm([TASK_77, TASK_308], texts[0])
            time.sleep(3)  # let the start-up work settle
            before = redis_calls(bench.redis)
            idle_percent, idle_by = idle_cpu(stack, args.idle_s)
            idle_calls = sum(calls_delta(before, redis_calls(bench.redis)).values())
            figures["idle_cpu_percent"] = idle_percent
            figures["idle_cpu_percent_by_process"] = idle_by
            figures["redis_idle_commands_per_s"] = round(idle_calls / args.idle_s, 1)
            print(f"idle CPU: {idle_percent:.1f}% of a core ({idle_by}); "
                  f"Redis {figures['redis_idle_commands_per_s']} commands/s", flush=True)

            before = redis_calls(bench.redis)
            started = time.perf_counter()
            latencies, stages = bench.steady(TASK_77, texts, args.rate, args.latency_jobs)
            steady_s = time.perf_counter() - started
            delta = calls_delta(before, redis_calls(bench.redis))
            per_job = sum(delta.values()) / args.latency_jobs
            background = figures["redis_idle_commands_per_s"] * steady_s / args.latency_jobs
            figures["redis_commands_per_job"] = round(per_job, 1)
            figures["redis_commands_per_job_less_idle"] = round(per_job - background, 1)
            figures["redis_commands_by_name_per_job"] = {
                name: round(n / args.latency_jobs, 2) for name, n in sorted(delta.items(), key=lambda x: -x[1])}
            figures["p50_ms"] = round(statistics.median(latencies), 1)
            figures["p95_ms"] = round(percentile(latencies, 95), 1)
            figures["latency_stages_ms"] = {
                name: {"p50": round(statistics.median(values), 1), "p95": round(percentile(values, 95), 1)}
                for name, values in stages.items()}
            print(f"steady {args.rate:g} jobs/s, {args.latency_jobs} single jobs: p50 {figures['p50_ms']} ms, "
                  f"p95 {figures['p95_ms']} ms; Redis {figures['redis_commands_per_job']} commands/job "
                  f"({figures['redis_commands_per_job_less_idle']} less the idle traffic): "
                  f"{figures['redis_commands_by_name_per_job']}", flush=True)
            print(f"stages (ms): {figures['latency_stages_ms']}", flush=True)
            # Round trips: a shorter steady run of its own, under MONITOR.
            trip_jobs = max(1, args.latency_jobs // 2)
            with RoundTrips(redis.Redis.from_url(stack.redis_url)) as trips:
                time.sleep(IDLE_TRIPS_S)
                idle_trips, idle_scripted, idle_names = trips.trips, trips.script_commands, Counter(trips.by_name)
                started = time.perf_counter()
                bench.steady(TASK_77, texts[1:], args.rate, trip_jobs)
                trips_s = time.perf_counter() - started
            # After the monitor's last line (its stream may lag the commands).
            job_trips, job_scripted = trips.trips - idle_trips, trips.script_commands - idle_scripted
            background = idle_trips / IDLE_TRIPS_S * trips_s
            figures["redis_round_trips_per_job"] = round(job_trips / trip_jobs, 1)
            figures["redis_round_trips_per_job_less_idle"] = round((job_trips - background) / trip_jobs, 1)
            figures["redis_script_commands_per_job"] = round(job_scripted / trip_jobs, 1)
            figures["redis_round_trips_by_command_per_job"] = {
                name: round(n / trip_jobs, 2) for name, n in (trips.by_name - idle_names).most_common()}
            print(f"Redis round trips per job: {figures['redis_round_trips_per_job']} "
                  f"({figures['redis_round_trips_per_job_less_idle']} less the idle traffic), and "
                  f"{figures['redis_script_commands_per_job']} commands inside scripts "
                  f"({trip_jobs} single jobs under MONITOR): {figures['redis_round_trips_by_command_per_job']}",
                  flush=True)
            if not args.base_only_redis:
                bare = bare_embed_latency_ms(stack, texts, 200)
                figures["embed_call_p50_ms"] = round(statistics.median(bare), 2)
                figures["embed_call_p95_ms"] = round(percentile(bare, 95), 2)
                print(f"bare Embed call: p50 {figures['embed_call_p50_ms']} ms, "
                      f"p95 {figures['embed_call_p95_ms']} ms", flush=True)
                for workers in (() if args.only_latency else worker_counts):
                    if workers == 2:
                        stack.start_worker(k.POOL_SMALL, name="worker-small-2")
                        bench.warm([TASK_77, TASK_308], texts[1])
                    for task, labels in ((TASK_77, 77), (TASK_308, 300)):
                        # Untimed first: the pool's threads, connections and batches reach their steady state.
                        bench.throughput(task, rows[:args.warm_jobs], args.batch)
                        rounds = [bench.throughput(task, rows, args.batch) for _ in range(args.rounds)]
                        result = sorted(rounds, key=lambda r: r["jobs_per_s"])[len(rounds) // 2]
                        suffix = f"_{labels}_labels" + ("" if workers == 1 else "_2_workers")
                        figures[f"jobs_per_s{suffix}"] = result["jobs_per_s"]
                        figures[f"jobs_per_s{suffix}_rounds"] = [r["jobs_per_s"] for r in rounds]
                        figures[f"ratio{suffix}"] = round(result["jobs_per_s"] / offline_per_s, 4)
                        figures[f"accuracy{suffix}"] = result["accuracy"]
                        figures[f"cpu_ms_per_job{suffix}"] = result["cpu_ms_per_job"]
                        print(f"{workers} small worker(s), {task}: {result['jobs_per_s']} jobs/s, the median of "
                              f"{[r['jobs_per_s'] for r in rounds]} ({figures[f'ratio{suffix}']:.3f}x offline), "
                              f"{result['succeeded']}/{len(rows)} succeeded, intent accuracy {result['accuracy']:.3f}; "
                              f"CPU ms per job by process: {result['cpu_ms_per_job']}", flush=True)
        finally:
            stack.stop_all()
    if not (args.base_only_redis or args.only_latency):
        figures["offline_embed_texts_per_s"] = round(offline_per_s, 2)
        if 1 in worker_counts:
            figures["label_count_ratio_300_vs_77"] = round(figures["jobs_per_s_300_labels"]
                                                          / figures["jobs_per_s_77_labels"], 4)
    print(json.dumps({"bench": "pipeline_classify", "jobs": len(rows), **figures}))


if __name__ == "__main__":
    main()

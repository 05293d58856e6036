"""Chaos: six faults against the real stack under a stream of jobs; what became of every accepted job.

    .venv/bin/python bench/chaos.py [--jobs 300] [--rate 20] [--only redis-kill,worker-kill]

The whole stack runs as local processes (`smallfirst.cli.stack.Stack`: Redis with AOF, the embedding
inference service on vLLM's CPU build, the frontier simulator, the API, the small, frontier and
webhooks pools under the stack's supervisor). Each scenario sends `--jobs` jobs at `--rate` a second
(classify jobs on the small tier and summaries on the frontier tier, alternating; in slow-webhooks
each with a callback), and strikes a third of the way through:

- redis-kill: redis-server SIGKILLed, started again on its AOF 2 s later.
- redis-restart: redis-server shut down gracefully (SHUTDOWN) and started again, three times.
- worker-kill: the small and the frontier pools SIGKILLed (the supervisor starts them again).
- inference-kill: the embedding inference server SIGKILLed, started again after 10 s.
- frontier-storm: the simulator answers 15 % 429, 8 % 529, 7 % 500 and drops 5 % of connections.
- slow-webhooks: half the jobs call back a receiver that answers a byte every 2 s, the other half a
  prompt one (another tenant).

Baseline: a calm run of the same stream before any fault (scenario "calm"), in the same stack; a
scenario's figures are read against it. After each stream the bench waits for every accepted job
to end (`--settle-s`), then counts, of the jobs the API accepted (202): ended, stuck (never ended),
lost (404 after their 202), duplicates (answered more than once), double_billed (billed more than
once on one tier for anything but a rejected answer). Target: 0 stuck, 0 lost, 0 duplicates and
0 double-billed in every scenario.

The last line printed is one JSON object: {"scenarios": {NAME: {"accepted", "ended", "stuck",
"lost", "duplicates", "double_billed"}}, ...}.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from smallfirst.cli.dev import bundled_embedding_model
from smallfirst.cli.job_stream import FRONTIER_JOB, SMALL_JOB, JobStream, StreamReport
from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import TenantRegistry

SCENARIOS = ("redis-kill", "redis-restart", "worker-kill", "inference-kill", "frontier-storm", "slow-webhooks")
STORM_RATES = {"429": 0.15, "529": 0.08, "500": 0.07, "drop": 0.05}
# Short leases and sweeps, as in the fault tests: recovery from a lost message or a dead worker
# happens within a scenario instead of after production's minutes.
CHAOS_ENV = {
    "SMALLFIRST_SWEEP_STALE_AFTER_S": "10",
    "SMALLFIRST_WORKER_EXIT_GRACE_S": "5",
    "SMALLFIRST_LOG_JSON": "false",
    "SMALLFIRST_WEBHOOK_TIMEOUT_S": "3",
}


@contextmanager
def receiver(drip_s: float | None) -> Iterator[tuple[str, list[int]]]:
    """A webhook receiver on loopback: prompt (drip_s None) or dripping its answer a byte every
    `drip_s` seconds. Yields its URL and the list of deliveries it got (one entry per request)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(256)
    server.settimeout(0.5)
    got: list[int] = []
    stopping = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                got.append(1)
                answer = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"
                if drip_s is None:
                    conn.sendall(answer)
                    return
                for byte in answer:
                    if stopping.is_set():
                        return
                    conn.sendall(bytes([byte]))
                    time.sleep(drip_s)
            except OSError:
                return

    def accept() -> None:
        while not stopping.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}/hooks", got
    finally:
        stopping.set()
        server.close()


class Chaos:
    def __init__(self, stack: Stack, embed_model: Path, jobs: int, rate: float, settle_s: float) -> None:
        self.stack = stack
        self.embed_model = embed_model
        self.jobs = jobs
        self.rate = rate
        self.settle_s = settle_s
        self.tenants = TenantRegistry(redis.Redis.from_url(stack.redis_url))

    def stream(self, name: str, faults: dict[int, Callable[[], None]],
               bodies: list[dict[str, Any]] | None = None, count: int | None = None) -> tuple[JobStream, StreamReport]:
        key = self.tenants.create(f"chaos-{name}").api_key
        stream = JobStream(self.stack.api_url, key, bodies or [SMALL_JOB, FRONTIER_JOB], count=count or self.jobs,
                           rate_per_s=self.rate)
        started = time.monotonic()
        stream.run(at_job=faults)
        report = stream.audit(settle_s=self.settle_s)
        print(f"{name}: {report.figures()} refused={report.refused} statuses={dict(report.statuses)} "
              f"errors={dict(report.errors)} in {time.monotonic() - started:.0f} s", flush=True)
        if report.stuck_jobs:
            print(f"  stuck, first: {json.dumps(report.stuck_jobs[:3], default=str)[:1500]}", flush=True)
        return stream, report

    def at_third(self, fault: Callable[[], None]) -> dict[int, Callable[[], None]]:
        return {self.jobs // 3: fault}

    def redis_kill(self) -> StreamReport:
        return self.stream("redis-kill", self.at_third(lambda: self.stack.restart_redis(graceful=False, down_s=2.0)))[1]

    def redis_restart(self) -> StreamReport:
        def restart() -> None:
            self.stack.restart_redis(graceful=True, down_s=1.0)

        faults = {self.jobs * step // 5: restart for step in (1, 2, 3)}
        return self.stream("redis-restart", faults)[1]

    def worker_kill(self) -> StreamReport:
        def kill() -> None:
            self.stack[f"worker-{k.POOL_SMALL}"].kill()
            self.stack[f"worker-{k.POOL_FRONTIER}"].kill()

        return self.stream("worker-kill", self.at_third(kill))[1]

    def inference_kill(self) -> StreamReport:
        def kill() -> None:
            self.stack["inference-embed"].kill()
            time.sleep(10)
            self.stack.start_inference("embed", self.embed_model).wait_ready()

        return self.stream("inference-kill", self.at_third(kill))[1]

    def frontier_storm(self) -> StreamReport:
        sim = self.stack["frontier-sim"]
        calm_argv = list(sim.argv)

        def storm() -> None:
            sim.argv = [*calm_argv, "--fault-rates", json.dumps(STORM_RATES), "--fault-seed", "7"]
            sim.restart()

        try:
            # The storm from the first job: restarting the simulator is itself a short outage.
            storm()
            return self.stream("frontier-storm", {})[1]
        finally:
            sim.argv = calm_argv
            sim.restart()

    def slow_webhooks(self) -> StreamReport:
        slow_tenant = self.tenants.create("chaos-slow-hooks")
        with receiver(drip_s=2.0) as (slow_url, _slow_got), receiver(drip_s=None) as (fast_url, fast_got):
            # The slow tenant's jobs run beside the prompt tenant's: its stream on a thread of its own.
            slow_bodies = [{**body, "callback_url": slow_url} for body in (SMALL_JOB, FRONTIER_JOB)]
            slow = JobStream(self.stack.api_url, slow_tenant.api_key, slow_bodies, count=self.jobs // 2,
                             rate_per_s=self.rate / 2)
            slow_thread = threading.Thread(target=slow.run, daemon=True)
            slow_thread.start()
            fast_bodies = [{**body, "callback_url": fast_url} for body in (SMALL_JOB, FRONTIER_JOB)]
            _, fast_report = self.stream("slow-webhooks (prompt tenant)", {}, fast_bodies)
            slow_thread.join()
            slow_report = slow.audit(settle_s=self.settle_s)
            deadline = time.monotonic() + 60
            while len(fast_got) < fast_report.ended and time.monotonic() < deadline:
                time.sleep(0.5)
            print(f"slow-webhooks: prompt tenant's callbacks received {len(fast_got)} of {fast_report.ended}; "
                  f"slow tenant {slow_report.figures()}", flush=True)
        merged = StreamReport()
        for part in (fast_report, slow_report):
            for key, value in part.figures().items():
                setattr(merged, key, getattr(merged, key) + value)
        merged.statuses = fast_report.statuses + slow_report.statuses
        self.fast_callbacks = (len(fast_got), fast_report.ended)
        return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=300, help="jobs per scenario")
    parser.add_argument("--rate", type=float, default=20.0, help="jobs per second")
    parser.add_argument("--settle-s", type=float, default=180.0, help="how long to wait for the jobs to end")
    parser.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenario names")
    args = parser.parse_args()
    chosen = [name for name in args.only.split(",") if name]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {sorted(unknown)}")

    embed_model = bundled_embedding_model()
    results: dict[str, dict[str, int]] = {}
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = StackConfig(workdir=Path(tmp), catalog_path=default_catalog_path(),
                             frontier_sim_args=["--latency-ms", "200"], small_concurrency=16,
                             frontier_concurrency=16, job_lease_s=10, sweep_interval_s=1.0, extra_env=CHAOS_ENV)
        stack = Stack(config)
        try:
            started = time.monotonic()
            stack.start_all(embed_model=embed_model)
            stack.start_supervisor(interval_s=0.5)
            print(f"stack up in {time.monotonic() - started:.0f} s (logs in {stack.logs})", flush=True)
            chaos = Chaos(stack, embed_model, args.jobs, args.rate, args.settle_s)
            # Warm the label index and the engines, then the calm baseline.
            chaos.stream("warm-up", {}, count=20)
            calm = chaos.stream("calm", {})[1]
            extra["calm"] = calm.figures()
            for name in chosen:
                report: StreamReport = getattr(chaos, name.replace("-", "_"))()
                results[name] = report.figures()
            if "slow-webhooks" in chosen:
                received, ended = chaos.fast_callbacks
                extra["slow_webhooks_prompt_tenant_callbacks"] = {"received": received, "jobs_ended": ended}
            extra["worker_restarts"] = {name: c.restarts for name, c in stack.components.items() if c.supervised}
        finally:
            stack.stop_all()
    clean = all(r["accepted"] == r["ended"] and not (r["stuck"] or r["lost"] or r["duplicates"] or r["double_billed"])
                for r in results.values())
    print(f"{'all clean' if clean else 'DEFECTS'}: every accepted job ended once and was billed once"
          if clean else "DEFECTS: see the scenarios above", flush=True)
    print(json.dumps({"scenarios": results, **extra, "clean": clean}))


if __name__ == "__main__":
    main()

"""The whole smallfirst stack as local processes: what `smallfirst dev` runs and the end-to-end
tests start. Each component is a real process (redis-server, inference servers running vLLM,
Celery workers, uvicorn, the frontier simulator) that can be stopped, killed and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import redis

from smallfirst.common import constants as k
from smallfirst.common.errors import SmallfirstError

log = logging.getLogger(__name__)

EMBED_MODEL_NAME = "all-minilm-l6-v2"
GENERATOR_MODEL_NAME = "tiny-generator"


class StackError(SmallfirstError, RuntimeError):
    """A component of the stack did not start; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _smallfirst_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "smallfirst.cli", *args]


@dataclass
class Component:
    """One supervised process of the stack."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], bool]
    ready_timeout_s: float = 60.0
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    # Restarted by the stack's supervisor when it dies (see Stack.supervise_once); `wanted` is False
    # once it was stopped on purpose, so a stop is never undone. A kill is a crash: it stays wanted.
    supervised: bool = False
    wanted: bool = False
    restarts: int = 0

    def start(self, wait: bool = True) -> Component:
        self.wanted = True
        with self.log_path.open("ab") as log:
            # A new session, so that signals reach the whole process group (Celery's pool children,
            # vLLM's engine core and workers).
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
                                         cwd=self.cwd, start_new_session=True)
        if wait:
            self.wait_ready()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float | None = None) -> None:
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while time.monotonic() < deadline:
            if not self.alive():
                raise StackError(f"{self.name} exited during start-up:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise StackError(f"{self.name} was not ready within {timeout_s or self.ready_timeout_s} s:\n{self.tail()}")

    def signal(self, sig: int, group: bool = True) -> None:
        """`sig` to the component and its children, or (`group=False`) to its main process alone."""
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL to the component and its children: a crash, not a shutdown."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=15)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; the exit code (None if never started)."""
        self.wanted = False
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self, wait: bool = True) -> Component:
        self.stop()
        return self.start(wait=wait)

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"({self.name}: no log)"
        return f"--- {self.log_path} (last {lines} lines) ---\n" + "\n".join(text[-lines:])


# ---- Redis ---------------------------------------------------------------------------------------
# The one helper that starts a local redis-server: the stack, the tests and the benchmarks use it.
# AOF on and no eviction, the settings the job store relies on: a job record must survive a restart
# and never be evicted to make room. `appendfsync` decides what a crash may lose: `everysec` (the
# default) up to about a second of writes, `always` nothing acknowledged, at an fsync per write.
@dataclass(frozen=True)
class RedisTls:
    """Serve TLS on the server's port (plain TCP off), with these PEM files."""

    cert_file: Path
    key_file: Path
    ca_file: Path


@dataclass
class RedisServer:
    workdir: Path
    log_dir: Path | None = None
    port: int = field(default_factory=free_port)
    appendfsync: str = "everysec"
    password: str | None = None
    tls: RedisTls | None = None
    ready_timeout_s: float = 20.0
    binary: str | None = None
    component: Component | None = None
    # Redis's maxmemory (None: unlimited); with noeviction a write past it fails.
    maxmemory_bytes: int | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            # The CA in the URL: every client (redis-py, Celery's broker) verifies the server with it.
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        binary = self.binary or shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server is not installed")
        argv = [binary, "--bind", "127.0.0.1", "--dir", str(self.workdir), "--appendonly", "yes",
                "--appendfsync", self.appendfsync, "--save", "", "--maxmemory-policy", "noeviction",
                "--daemonize", "no"]
        if self.tls:
            argv += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.cert_file),
                     "--tls-key-file", str(self.tls.key_file), "--tls-ca-cert-file", str(self.tls.ca_file),
                     "--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(self.port)]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.maxmemory_bytes is not None:
            argv += ["--maxmemory", str(self.maxmemory_bytes)]
        return argv

    def client(self, socket_timeout_s: float = 0.5) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=socket_timeout_s)

    def pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_dir = self.log_dir or self.workdir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.component = Component(f"redis-{self.port}", self.argv(), {}, log_dir / f"redis-{self.port}.log",
                                   self.pings, self.ready_timeout_s)
        self.component.start()
        return self

    def alive(self) -> bool:
        return self.component is not None and self.component.alive()

    def kill(self) -> None:
        """SIGKILL: a crash; what the AOF had not written is lost."""
        if self.component is not None:
            self.component.kill()

    def stop(self) -> None:
        if self.component is not None:
            self.component.stop()

    def restart(self) -> None:
        """Start again on the same port and data folder (the AOF brings the data back)."""
        if self.alive():
            self.stop()
        time.sleep(0.1)
        self.start()

    def flush(self) -> None:
        self.client().flushall()



@dataclass
class StackConfig:
    workdir: Path
    catalog_path: Path
    redis_url: str | None = None  # None: start a local redis-server
    anthropic_api_key: str | None = None  # None: start the frontier simulator
    frontier_sim_args: list[str] = field(default_factory=list)
    small_concurrency: int = 32
    frontier_concurrency: int = 16
    webhook_concurrency: int = 8
    extra_env: dict[str, str] = field(default_factory=dict)
    # Inference servers already running (kind "embed"/"generate" -> port): used instead of starting them.
    inference_ports: dict[str, int] = field(default_factory=dict)
    # Short leases and sweeps make crash recovery observable in tests; production keeps the defaults.
    job_lease_s: int | None = None
    sweep_interval_s: float | None = None


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.workdir = config.workdir
        self.logs = config.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.components: dict[str, Component] = {}
        self.redis_url = config.redis_url or ""
        self.ports: dict[str, int] = dict(config.inference_ports)
        self.frontier_base_url: str | None = None
        self.frontier_is_simulated = config.anthropic_api_key is None
        self.redis: RedisServer | None = None  # None: Redis is the one config.redis_url names
        self._supervise_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._supervisor_stop = threading.Event()

    # ---- environment shared by every smallfirst process --------------------------------------
    def env(self) -> dict[str, str]:
        env = {
            "SMALLFIRST_REDIS_URL": self.redis_url,
            "SMALLFIRST_CATALOG_PATH": str(self.config.catalog_path),
            "SMALLFIRST_HEARTBEAT_DIR": str(self.workdir / "heartbeats"),
            "SMALLFIRST_INFERENCE_TARGETS": (
                f'{{"{EMBED_MODEL_NAME}": "127.0.0.1:{self.ports.get("embed", 0)}", '
                f'"{GENERATOR_MODEL_NAME}": "127.0.0.1:{self.ports.get("generate", 0)}"}}'
            ),
            "SMALLFIRST_ALLOW_PRIVATE_CALLBACKS": "true",
        }
        if self.frontier_base_url:
            env["SMALLFIRST_FRONTIER_BASE_URL"] = self.frontier_base_url
        env["ANTHROPIC_API_KEY"] = self.config.anthropic_api_key or "sim-key"
        if self.config.job_lease_s is not None:
            env["SMALLFIRST_JOB_LEASE_S"] = str(self.config.job_lease_s)
        if self.config.sweep_interval_s is not None:
            env["SMALLFIRST_SWEEP_INTERVAL_S"] = str(self.config.sweep_interval_s)
        env.update(self.config.extra_env)
        return env

    def _add(self, component: Component) -> Component:
        self.components[component.name] = component
        return component

    def __getitem__(self, name: str) -> Component:
        return self.components[name]

    # ---- components ----------------------------------------------------------------------------
    def start_redis(self) -> None:
        if self.config.redis_url:
            return
        if shutil.which("redis-server") is None:
            raise StackError("redis-server is not installed and REDIS_URL is not set")
        server = RedisServer(self.workdir / "redis", log_dir=self.logs)
        server.start()
        assert server.component is not None
        self.redis = server
        self.ports["redis"] = server.port
        self.redis_url = server.url
        self.components["redis"] = server.component

    # ---- faults (tests and bench/chaos.py) -------------------------------------------------------
    def restart_redis(self, *, graceful: bool, down_s: float = 1.0) -> None:
        """Stop the stack's redis-server, by SHUTDOWN (it writes its AOF and leaves) or by SIGKILL
        (a crash: the AOF holds what it had written), and start it again on the same port and data
        after `down_s`."""
        if self.redis is None or self.redis.component is None:
            raise StackError("the stack does not run its own redis-server")
        if graceful:
            with contextlib.suppress(redis.RedisError):
                self.redis.client(socket_timeout_s=5).shutdown()
            assert self.redis.component.proc is not None
            try:
                self.redis.component.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.redis.kill()
            self.redis.component.wanted = False
        else:
            self.redis.kill()
        time.sleep(down_s)
        self.redis.start()
        assert self.redis.component is not None
        self.components["redis"] = self.redis.component

    def start_inference(self, kind: str, model_path: Path) -> Component:
        port = self.ports.setdefault(kind, free_port())
        name = EMBED_MODEL_NAME if kind == "embed" else GENERATOR_MODEL_NAME
        env = {
            "SMALLFIRST_INFERENCE_MODEL_PATH": str(model_path),
            "SMALLFIRST_INFERENCE_SERVED_MODEL_NAME": name,
            "SMALLFIRST_INFERENCE_RUNNER": "pooling" if kind == "embed" else "generate",
            "SMALLFIRST_INFERENCE_LOAD_FORMAT": "auto" if kind == "embed" else "dummy",
            "SMALLFIRST_INFERENCE_HOST": "127.0.0.1",
            "SMALLFIRST_INFERENCE_PORT": str(port),
            "SMALLFIRST_INFERENCE_METRICS_PORT": "0",
            # A development stack: reflection on, for grpcurl (off by default elsewhere).
            "SMALLFIRST_INFERENCE_REFLECTION": "true",
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        component = Component(f"inference-{kind}", _smallfirst_argv("inference"), {**self.env(), **env},
                              self.logs / f"inference-{kind}.log", lambda: port_open(port), 300)
        return self._add(component).start(wait=False)

    def start_frontier_sim(self) -> None:
        if not self.frontier_is_simulated:
            return
        port = self.ports.setdefault("frontier_sim", free_port())
        self.frontier_base_url = f"http://127.0.0.1:{port}"
        self._add(Component("frontier-sim", _smallfirst_argv("frontier-sim", "--host", "127.0.0.1", "--port",
                                                              str(port), *self.config.frontier_sim_args),
                            self.env(), self.logs / "frontier-sim.log", lambda: port_open(port), 60)).start()

    def start_worker(self, pool: str, name: str | None = None, env: dict[str, str] | None = None,
                     wait: bool = True) -> Component:
        """Start a worker pool's process; `env` adds settings of its own (e.g. a fault to inject)."""
        name = name or f"worker-{pool}"
        concurrency = {k.POOL_SMALL: self.config.small_concurrency, k.POOL_WEBHOOKS: self.config.webhook_concurrency
                       }.get(pool, self.config.frontier_concurrency)
        heartbeat = self.workdir / "heartbeats" / f"smallfirst-worker-{pool}.heartbeat"
        heartbeat.unlink(missing_ok=True)
        component = Component(name, _smallfirst_argv("worker", "--pool", pool, "--concurrency", str(concurrency),
                                                     "--hostname", f"{name}@%h"),
                              {**self.env(), **(env or {})}, self.logs / f"{name}.log", heartbeat.exists, 90,
                              supervised=True)
        return self._add(component).start(wait=wait)

    def start_api(self) -> Component:
        port = self.ports.setdefault("api", free_port())
        component = Component("api", _smallfirst_argv("api", "--host", "127.0.0.1", "--port", str(port)),
                              self.env(), self.logs / "api.log", lambda: port_open(port), 60)
        return self._add(component).start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}"

    def start_all(self, embed_model: Path | None = None, generator_model: Path | None = None) -> None:
        self.start_redis()
        # Both engines load while the rest starts; they are the slow part (vLLM start-up).
        engines = [self.start_inference(kind, model) for kind, model in (("embed", embed_model),
                                                                          ("generate", generator_model))
                   if kind not in self.config.inference_ports and model is not None]
        self.start_frontier_sim()
        self.start_api()
        for engine in engines:
            engine.wait_ready()
        self.start_worker(k.POOL_SMALL)
        self.start_worker(k.POOL_FRONTIER)
        self.start_worker(k.POOL_WEBHOOKS)

    # ---- supervision -----------------------------------------------------------------------------
    def supervise_once(self) -> list[str]:
        """Start again every supervised component (the worker pools) that died without being stopped
        on purpose: a worker exits non-zero when its consumer cannot recover (worker_app), and must
        come back. Returns the names restarted."""
        restarted = []
        with self._supervise_lock:
            for name, component in list(self.components.items()):
                if not component.supervised or not component.wanted or component.proc is None or component.alive():
                    continue
                log.warning("%s exited with code %s; restarting it", name, component.proc.returncode)
                with component.log_path.open("ab") as out:
                    out.write(f"\n--- supervisor: exited with code {component.proc.returncode}; restarting ---\n"
                              .encode())
                component.restarts += 1
                component.start(wait=False)
                restarted.append(name)
        return restarted

    def start_supervisor(self, interval_s: float = 1.0) -> None:
        """`supervise_once` every `interval_s` on a background thread, until `stop_all`."""
        if self._supervisor is not None:
            return
        self._supervisor_stop.clear()

        def run() -> None:
            while not self._supervisor_stop.wait(interval_s):
                self.supervise_once()

        self._supervisor = threading.Thread(target=run, name="stack-supervisor", daemon=True)
        self._supervisor.start()

    def stop_supervisor(self) -> None:
        self._supervisor_stop.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=10)
            self._supervisor = None

    def stop_all(self) -> None:
        self.stop_supervisor()
        # Workers first (they drain), then what they depend on, Redis last.
        order = [n for n in self.components if n.startswith("worker")] + [
            n for n in self.components if not n.startswith("worker") and n != "redis"] + ["redis"]
        for name in order:
            if name in self.components:
                self.components[name].stop()

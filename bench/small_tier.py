"""Small-tier throughput: the same Banking77 inputs through vLLM offline and through the gRPC service.

    .venv/bin/python bench/small_tier.py [--texts 2000] [--prompts 1024] [--max-tokens 32] [--task-prompts 512]
        [--clients 64] [--gen-clients 512] [--rounds 3] [--only embedding|generation]
        [--gen-hidden-size 128] [--gen-layers 2] [--dataset PATH] [--server-arg=--engine-metrics ...]

For each model, in one run on the same machine and with the same engine settings (the service's
default dtype on this machine, eager mode, 1 GiB of KV cache, 256 sequences and 4096 tokens per
step):
- offline: vLLM's `LLM` class in a process of its own, handed every input at once (`LLM.embed`,
  `LLM.generate`): the engine's best case, with no server in the way.
- grpc: the inference service (`smallfirst inference`, a separate process, deployed defaults
  otherwise; `--server-arg` adds arguments) called by many concurrent callers, one input per call,
  as the small-tier workers call it. Two kinds of callers, in this process: grpc.aio coroutines
  (`grpc_aio`), and threads sharing the workers' own sync `InferenceClient` (`grpc_threads`).
The models: the bundled all-MiniLM-L6-v2 (embeddings, texts/s) and the tiny random-weight Llama
written by `smallfirst make-tiny-model` (greedy, generated tokens/s; `--gen-hidden-size`/
`--gen-layers` make it wider and deeper). Two generation workloads:
- `generation`: the raw Banking77 texts as plain prompts, `--max-tokens` (32) tokens each: short
  calls, so the per-call cost of a service weighs most (the worst case);
- `generation_task`: what a small-tier generate job sends: the catalog's `email_summary` prompts
  (system and user, rendered with the model's chat template; offline through `LLM.chat`) with
  Banking77 messages as the emails, and the task's own max_tokens (128). Both sides' prompt token
  counts are printed: equal, or the comparison is void.

Both engines stay up for the whole run, idle between passes, and the passes alternate (offline,
aio, threads, offline, ...), so that each round's figures saw the same background load on a shared
machine. Reported: the best round of each mode and their ratio, and the median of the per-round
ratios. On a machine this small the callers share the CPUs with the server; the tiny generator
does next to no arithmetic per token, so the service's per-call work weighs most there. So each
mode also reports the CPU milliseconds per input spent by the engine's front-end process (the one
holding `LLM` or `AsyncLLM`; offline it only tokenizes and collects outputs, the service also
runs gRPC and one asyncio task per call) and by the callers (this process).

It also reports the quality of embedding classification on the Banking77 texts (not the
catalog's seed examples, which serve as the label texts as in the executor): accuracy, and for a
few `min_confidence` thresholds the share the small tier keeps and its accuracy on that share.

The last line printed is one JSON object with the figures and the ratios (target: gRPC at least
0.85x offline).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smallfirst.cli.stack import free_port
from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from smallfirst.common.prompts import render_prompt
from smallfirst.inference.dtypes import platform_dtype
from smallfirst.inference.tiny_model import TinyModelShape, write_tiny_model
from smallfirst.small_worker.executor import DEFAULT_CLASSIFY_TEMPERATURE, softmax
from smallfirst.small_worker.inference_client import InferenceClient
from smallfirst.small_worker.label_index import LabelIndex, label_texts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
EMBED_MODEL = "all-minilm-l6-v2"
GEN_MODEL = "tiny-generator"
KV_CACHE_GIB = 1
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 4096
# vLLM logs to stdout too; the child's result is the line carrying this mark.
RESULT_MARK = "SMALL_TIER_OFFLINE_RESULT "
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# The task workload: what a small-tier generate job sends (system and user prompts rendered from the
# catalog, the task's own max_tokens), here with Banking77 messages as the emails.
SUMMARY_TASK = "email_summary"
# After its last step an engine's core and worker keep polling their shared-memory queues for a
# second (vLLM's SpinCondition, busy_loop_s=1) before they sleep: a pass that started at once would
# share the CPUs with the engine that just finished. Every pass waits this long first.
SETTLE_S = 2.0


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used, its threads included, its children not."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """CPU used during one pass by the engine's front end (the process holding AsyncLLM or LLM,
    not its engine-core and worker children) and by this process (the callers)."""

    def __init__(self, front_end_pid: int) -> None:
        self._pid = front_end_pid
        self.front_end_s = self.callers_s = 0.0

    def __enter__(self) -> CpuMeter:
        self._front_end0, self._callers0 = process_cpu_s(self._pid), own_cpu_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.front_end_s = process_cpu_s(self._pid) - self._front_end0
        self.callers_s = own_cpu_s() - self._callers0


# ---- offline (a child process: `small_tier.py _offline KIND MODEL INPUTS MAX_TOKENS`) ------------
def engine_kwargs() -> dict[str, Any]:
    """Engine settings both sides share (the LLM class's CPU defaults for the batch sizes)."""
    return {"dtype": platform_dtype().dtype, "enforce_eager": True, "kv_cache_memory_bytes": KV_CACHE_GIB * 2**30,
            "seed": 0, "max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}


def offline_main(kind: str, model_path: str, inputs_path: str, max_tokens: int) -> None:
    """Loads the model, then runs one timed pass over every input per `run` line read from stdin."""
    from vllm import LLM, SamplingParams

    inputs: list[Any] = json.loads(Path(inputs_path).read_text())
    if kind == "embed":
        llm = LLM(model=model_path, runner="pooling", **engine_kwargs())

        def one_pass() -> dict[str, Any]:
            outputs = llm.embed(inputs, use_tqdm=False)
            return {"items": len(outputs)}
    else:
        llm = LLM(model=model_path, load_format="dummy", max_model_len=4096, **engine_kwargs())
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

        def one_pass() -> dict[str, Any]:
            if kind == "chat":  # conversations, rendered with the model's chat template as the server does
                outputs = llm.chat(inputs, params, use_tqdm=False)
            else:
                outputs = llm.generate(inputs, params, use_tqdm=False)
            return {"items": len(outputs), "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                    "prompt_tokens": sum(len(o.prompt_token_ids or ()) for o in outputs)}

    one_pass()  # warm-up
    print(RESULT_MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        started = time.perf_counter()
        result = one_pass()
        result["seconds"] = time.perf_counter() - started
        print(RESULT_MARK + json.dumps(result), flush=True)


class Offline:
    """The offline engine in a child process, idle (no CPU) between the passes it is asked for."""

    def __init__(self, kind: str, model_path: Path, inputs: list[Any], max_tokens: int, log_dir: Path) -> None:
        self._inputs = log_dir / f"offline-{kind}-inputs.json"
        self._inputs.write_text(json.dumps(inputs))
        self.log_path = log_dir / f"offline-{kind}.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, __file__, "_offline", kind, str(model_path), str(self._inputs), str(max_tokens)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
        )
        self._result()

    def _result(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(RESULT_MARK):
                result: dict[str, Any] = json.loads(line[len(RESULT_MARK):])
                return result
        raise SystemExit(f"the offline engine exited:\n{self.log_path.read_text()[-4000:]}")

    def run(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return self._result()

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()


# ---- the service ---------------------------------------------------------------------------------
class Server:
    def __init__(self, model_path: Path, name: str, log_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"inference-{name}.log"
        argv = [sys.executable, "-c", "from smallfirst.cli.main import main; main()", "inference",
                "--model-path", str(model_path), "--served-model-name", name, "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", "0", "--dtype", platform_dtype().dtype, "--enforce-eager",
                "--kv-cache-space-gib", str(KV_CACHE_GIB), "--max-num-seqs", str(MAX_NUM_SEQS),
                "--max-num-batched-tokens", str(MAX_NUM_BATCHED_TOKENS), *extra]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"})
        self._wait_serving()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _wait_serving(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with grpc.insecure_channel(self.target) as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start in time")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def aio_pass(target: str, requests: list[Any], method: str, clients: int) -> tuple[float, list[Any]]:
    """`clients` coroutines, each sending one request at a time until none is left."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        call = getattr(stub, method)
        responses: list[Any] = [None] * len(requests)
        next_index = 0

        async def client() -> None:
            nonlocal next_index
            while next_index < len(requests):
                index = next_index
                next_index += 1
                responses[index] = await call(requests[index], timeout=300)

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - started, responses


def threads_pass(client: InferenceClient, work: list[Any], call: Any, clients: int) -> tuple[float, list[Any]]:
    with ThreadPoolExecutor(clients) as pool:
        started = time.perf_counter()
        results = list(pool.map(call, work))
        return time.perf_counter() - started, results


MODES = ("offline", "grpc_aio", "grpc_threads")


class Rounds:
    """Each mode's throughput per round, and the CPU its passes cost per input."""

    def __init__(self, unit: str, inputs: int) -> None:
        self.unit = unit
        self.inputs = inputs
        self.rates: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.front_end_ms: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.callers_ms: dict[str, list[float]] = {mode: [] for mode in MODES}

    def add(self, mode: str, rate: float, meter: CpuMeter) -> None:
        time.sleep(SETTLE_S)  # before the next pass, whichever it is
        self.rates[mode].append(rate)
        self.front_end_ms[mode].append(meter.front_end_s / self.inputs * 1e3)
        self.callers_ms[mode].append(meter.callers_s / self.inputs * 1e3)

    def summary(self) -> dict[str, Any]:
        """Best round of each mode, their ratios, and the median of the per-round ratios (each round
        runs offline and service back to back, so they saw the same background load). Also the
        median CPU milliseconds per input of the engine's front-end process and of the callers:
        on a machine this small they share the cores with the engine, so they explain the ratio."""
        best = {mode: max(rates) for mode, rates in self.rates.items()}
        out: dict[str, Any] = {"unit": self.unit, **{mode: round(rate, 1) for mode, rate in best.items()}}
        for mode in ("grpc_aio", "grpc_threads"):
            out[f"ratio_{mode}"] = round(best[mode] / best["offline"], 3)
            paired = [g / o for g, o in zip(self.rates[mode], self.rates["offline"], strict=True)]
            out[f"ratio_{mode}_median_paired"] = round(statistics.median(paired), 3)
        out["rounds"] = {mode: [round(r, 1) for r in rates] for mode, rates in self.rates.items()}
        out["cpu_ms_per_input"] = {
            mode: {"front_end": round(statistics.median(self.front_end_ms[mode]), 3),
                   "callers": round(statistics.median(self.callers_ms[mode]), 3)}
            for mode in MODES
        }
        return out


# ---- classification quality -----------------------------------------------------------------------
def classify_quality(vectors: np.ndarray, intents: list[str], client: InferenceClient) -> dict[str, Any]:
    catalog = load_catalog(default_catalog_path())
    task = catalog.get("banking77_intent")
    if task is None:
        return {"skipped": "no banking77_intent task in the default catalog"}
    texts_by_label = [label_texts(label) for label in task.labels]
    flat = [t for texts in texts_by_label for t in texts]
    label_vectors = client.embed(EMBED_MODEL, flat, truncate=True, timeout_s=300).vectors
    owners = np.array([i for i, texts in enumerate(texts_by_label) for _ in texts])
    index = LabelIndex(names=task.label_names, vectors=label_vectors, owners=owners)
    correct, confidence = [], []
    for vector, intent in zip(vectors, intents, strict=True):
        probabilities = softmax(index.label_scores(vector), DEFAULT_CLASSIFY_TEMPERATURE)
        best = int(np.argmax(probabilities))
        correct.append(index.names[best] == intent)
        confidence.append(float(probabilities[best]))
    right, conf = np.array(correct), np.array(confidence)
    by_threshold = {}
    for threshold in THRESHOLDS:
        kept = conf >= threshold
        by_threshold[str(threshold)] = {
            "kept_share": round(float(kept.mean()), 3),
            "accuracy_kept": round(float(right[kept].mean()), 3) if kept.any() else None,
        }
    return {"texts": len(intents), "accuracy": round(float(right.mean()), 3),
            "temperature": DEFAULT_CLASSIFY_TEMPERATURE, "by_min_confidence": by_threshold}


# ---- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--texts", type=int, default=2000, help="Banking77 texts to embed")
    parser.add_argument("--prompts", type=int, default=1024, help="Banking77 texts used as generation prompts")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per answer of the short workload")
    parser.add_argument("--task-prompts", type=int, default=512,
                        help=f"Banking77 texts summarized by the catalog's {SUMMARY_TASK} task (task workload)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent callers of Embed")
    parser.add_argument("--gen-clients", type=int, default=512, help="concurrent callers of Generate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["embedding", "generation"], help="run one of the two models only")
    parser.add_argument("--gen-hidden-size", type=int, default=TinyModelShape.hidden_size,
                        help="a wider generator (heads of 64) to see the ratio when compute weighs more")
    parser.add_argument("--gen-layers", type=int, default=TinyModelShape.num_hidden_layers)
    parser.add_argument("--server-arg", action="append", default=[],
                        help="an extra `smallfirst inference` argument (repeatable): --server-arg=--engine-metrics")
    args = parser.parse_args()

    from smallfirst.inference.models import bundled_embedding_model_path

    catalog_task = load_catalog(default_catalog_path()).get("banking77_intent")
    seeds = {t for label in catalog_task.labels for t in label.examples} if catalog_task else set()
    with args.dataset.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["text"].strip() not in seeds]
    texts = [r["text"] for r in rows[: args.texts]]
    intents = [r["category"] for r in rows[: args.texts]]
    prompts = [r["text"] for r in rows[: args.prompts]]
    workdir = Path(tempfile.mkdtemp(prefix="bench-small-tier-"))
    embed_path = bundled_embedding_model_path()
    heads = args.gen_hidden_size // 64
    shape = TinyModelShape(hidden_size=args.gen_hidden_size, intermediate_size=2 * args.gen_hidden_size,
                           num_hidden_layers=args.gen_layers, num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 2))
    gen_path = write_tiny_model(workdir / GEN_MODEL, [args.dataset], shape)
    summary_task = load_catalog(default_catalog_path()).get(SUMMARY_TASK)
    assert summary_task is not None, f"the default catalog has no {SUMMARY_TASK} task"
    conversations = []
    for text in [r["text"] for r in rows[: args.task_prompts]]:
        rendered = render_prompt(summary_task, {"text": text})
        conversations.append([{"role": "system", "content": rendered.system},
                              {"role": "user", "content": rendered.user}])
    workloads = [
        GenerationWorkload("generation", prompts=prompts, max_tokens=args.max_tokens),
        GenerationWorkload("generation_task", conversations=conversations, max_tokens=summary_task.small.max_tokens),
    ]
    result: dict[str, Any] = {"bench": "small_tier", "cpus": os.cpu_count(), "embed_clients": args.clients,
                              "generate_clients": args.gen_clients, "rounds": args.rounds,
                              "max_tokens": args.max_tokens,
                              "generator": {"hidden_size": shape.hidden_size, "layers": shape.num_hidden_layers}}

    try:
        if args.only != "generation":
            run_embedding(args, result, embed_path, texts, intents, workdir)
        if args.only != "embedding":
            run_generation(args, result, gen_path, workloads, workdir)
    finally:
        # Failures have already printed the tail of the log that explains them.
        shutil.rmtree(workdir, ignore_errors=True)
    result["target_ratio"] = 0.85
    # Per caller kind; grpc_threads is the small-tier workers' own client.
    result["meets_target"] = {
        name: {mode: result[name][f"ratio_{mode}"] >= 0.85 for mode in ("grpc_aio", "grpc_threads")}
        for name in ("embedding", "generation", "generation_task") if name in result
    }
    print(json.dumps(result))


def run_embedding(args: argparse.Namespace, result: dict[str, Any], embed_path: Path, texts: list[str],
                  intents: list[str], workdir: Path) -> None:
    """Offline and service alive together, their passes alternating."""
    print(f"embedding: {len(texts)} texts, {args.rounds} rounds", flush=True)
    offline = Offline("embed", embed_path, texts, 0, workdir)
    server = Server(embed_path, EMBED_MODEL, workdir, *args.server_arg)
    client = InferenceClient({EMBED_MODEL: server.target}, default_timeout_s=300)
    embed_requests = [pb.EmbedRequest(model=EMBED_MODEL, texts=[t]) for t in texts]
    rounds = Rounds("texts/s", len(texts))
    try:
        asyncio.run(aio_pass(server.target, embed_requests[:256], "Embed", args.clients))
        time.sleep(SETTLE_S)
        responses: list[Any] = []
        for _ in range(args.rounds):
            with CpuMeter(offline.process.pid) as meter:
                seconds = offline.run()["seconds"]
            rounds.add("offline", len(texts) / seconds, meter)
            with CpuMeter(server.process.pid) as meter:
                seconds, responses = asyncio.run(aio_pass(server.target, embed_requests, "Embed", args.clients))
            rounds.add("grpc_aio", len(texts) / seconds, meter)
            with CpuMeter(server.process.pid) as meter:
                seconds, _ = threads_pass(client, texts, lambda t: client.embed(EMBED_MODEL, [t]), args.clients)
            rounds.add("grpc_threads", len(texts) / seconds, meter)
        vectors = np.array([list(r.embeddings[0].values) for r in responses], dtype=np.float32)
        quality = classify_quality(vectors, intents, client)
    finally:
        client.close()
        server.stop()
        offline.stop()
    result["embedding"] = rounds.summary()
    result["classification"] = quality
    print(f"embedding: {result['embedding']}", flush=True)


@dataclass(frozen=True)
class GenerationWorkload:
    """Generation inputs, the same on both sides: plain prompts, or chat conversations that the
    offline `LLM.chat` and the server render with the model's chat template."""

    name: str
    prompts: list[str] | None = None
    conversations: list[list[dict[str, str]]] | None = None
    max_tokens: int = 32

    @property
    def inputs(self) -> list[Any]:
        return list(self.prompts if self.prompts is not None else self.conversations or [])

    def request(self, item: Any) -> pb.GenerateRequest:
        request = pb.GenerateRequest(model=GEN_MODEL, sampling=pb.SamplingParams(temperature=0.0,
                                                                                 max_tokens=self.max_tokens))
        if self.prompts is not None:
            request.prompt = item
        else:
            request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in item)
        return request

    def call(self, client: InferenceClient, item: Any) -> Any:
        if self.prompts is not None:
            return client.generate(GEN_MODEL, prompt=item, temperature=0.0, max_tokens=self.max_tokens)
        return client.generate(GEN_MODEL, messages=[(m["role"], m["content"]) for m in item], temperature=0.0,
                               max_tokens=self.max_tokens)


def run_generation(args: argparse.Namespace, result: dict[str, Any], gen_path: Path,
                   workloads: list[GenerationWorkload], workdir: Path) -> None:
    """One server for every workload; an offline engine per workload, alive during its rounds."""
    server = Server(gen_path, GEN_MODEL, workdir, "--load-format", "dummy", "--max-model-len", "4096",
                    *args.server_arg)
    client = InferenceClient({GEN_MODEL: server.target}, default_timeout_s=300)
    try:
        for workload in workloads:
            inputs = workload.inputs
            print(f"{workload.name}: {len(inputs)} inputs x {workload.max_tokens} tokens, {args.rounds} rounds",
                  flush=True)
            offline = Offline("generate" if workload.prompts is not None else "chat", gen_path, inputs,
                              workload.max_tokens, workdir)
            requests = [workload.request(item) for item in inputs]
            rounds = Rounds("generated tokens/s", len(inputs))
            prompt_tokens: dict[str, int] = {}
            try:
                asyncio.run(aio_pass(server.target, requests[:256], "Generate", args.gen_clients))
                time.sleep(SETTLE_S)
                for _ in range(args.rounds):
                    with CpuMeter(offline.process.pid) as meter:
                        done = offline.run()
                    rounds.add("offline", done["tokens"] / done["seconds"], meter)
                    prompt_tokens["offline"] = done["prompt_tokens"]
                    with CpuMeter(server.process.pid) as meter:
                        seconds, responses = asyncio.run(
                            aio_pass(server.target, requests, "Generate", args.gen_clients))
                    rounds.add("grpc_aio", sum(r.usage.completion_tokens for r in responses) / seconds, meter)
                    prompt_tokens["grpc"] = sum(r.usage.prompt_tokens for r in responses)
                    with CpuMeter(server.process.pid) as meter:
                        seconds, generations = threads_pass(client, inputs, partial(workload.call, client),
                                                            args.gen_clients)
                    rounds.add("grpc_threads", sum(g.completion_tokens for g in generations) / seconds, meter)
            finally:
                offline.stop()
            # Both sides saw the same prompts: the same token count, or the comparison is void.
            result[workload.name] = {**rounds.summary(), "max_tokens": workload.max_tokens,
                                     "prompt_tokens": prompt_tokens}
            print(f"{workload.name}: {result[workload.name]}", flush=True)
    finally:
        client.close()
        server.stop()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_offline":
        offline_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        main()

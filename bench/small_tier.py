"""Small-tier throughput: the same Banking77 inputs through vLLM offline and through the gRPC service.

    .venv/bin/python bench/small_tier.py [--texts 2000] [--prompts 512] [--max-tokens 32]
                                         [--clients 64] [--rounds 2] [--dataset PATH]

For each model, in one run on the same machine and with the same engine settings (dtype
bfloat16, eager mode, 1 GiB of KV cache):
- offline: vLLM's `LLM` class in a process of its own, handed every input at once (`LLM.embed`,
  `LLM.generate`): the engine's best case, with no server in the way.
- grpc: the inference service (`smallfirst inference`, a separate process) called by `--clients`
  concurrent callers, one input per call, as the small-tier workers call it. Two kinds of
  callers: grpc.aio coroutines (`grpc_aio`), and threads sharing the workers' own sync
  `InferenceClient` (`grpc_threads`), each in this process.
The models: the bundled all-MiniLM-L6-v2 (embeddings, texts/s) and the tiny random-weight Llama
written by `smallfirst make-tiny-model` (greedy free text of `--max-tokens` tokens, tokens/s).

Each figure is the best of `--rounds` timed passes (the machine is shared; the best pass is the
least disturbed one), after an untimed warm-up pass. Offline and service never run at the same
time. The engine's own work is the same in both; what the ratio measures is the cost of the
service (gRPC, protobuf, the asyncio front end) and of the callers, which here share the CPUs.

It also reports the quality of embedding classification on the Banking77 texts (with the
catalog's seed examples as label texts, as the executor does): accuracy, and for a few
`min_confidence` thresholds the share the small tier keeps and its accuracy on that share.

The last line printed is one JSON object with the figures and the ratios (target: gRPC at least
0.85x offline).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from smallfirst.common.catalog import default_catalog_path, load_catalog
from smallfirst.common.pb.inference.v1 import inference_pb2 as pb
from smallfirst.common.pb.inference.v1 import inference_pb2_grpc as pb_grpc
from smallfirst.small_worker.executor import DEFAULT_CLASSIFY_TEMPERATURE, softmax
from smallfirst.small_worker.inference_client import InferenceClient
from smallfirst.small_worker.label_index import LabelIndex, label_texts

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
EMBED_MODEL = "all-minilm-l6-v2"
GEN_MODEL = "tiny-generator"
KV_CACHE_GIB = 1
DTYPE = "bfloat16"
# vLLM logs to stdout too; the child's result is the line carrying this mark.
RESULT_MARK = "SMALL_TIER_OFFLINE_RESULT "
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- offline (runs in a child process: `small_tier.py _offline KIND MODEL INPUTS ...`) ---------
def offline_main(kind: str, model_path: str, inputs_path: str, rounds: int, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    inputs: list[str] = json.loads(Path(inputs_path).read_text())
    common: dict[str, Any] = {"dtype": DTYPE, "enforce_eager": True, "kv_cache_memory_bytes": KV_CACHE_GIB * 2**30,
                              "seed": 0}
    if kind == "embed":
        llm = LLM(model=model_path, runner="pooling", **common)
        llm.embed(inputs[:64], use_tqdm=False)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            outputs = llm.embed(inputs, use_tqdm=False)
            times.append(time.perf_counter() - started)
            assert len(outputs) == len(inputs)
        result = {"items": len(inputs), "seconds": times}
    else:
        llm = LLM(model=model_path, load_format="dummy", max_model_len=4096, **common)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        llm.generate(inputs[:64], params, use_tqdm=False)
        times, tokens = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            outputs = llm.generate(inputs, params, use_tqdm=False)
            times.append(time.perf_counter() - started)
            tokens.append(sum(len(o.outputs[0].token_ids) for o in outputs))
        result = {"items": len(inputs), "seconds": times, "tokens": tokens}
    print(RESULT_MARK + json.dumps(result), flush=True)


def run_offline(kind: str, model_path: Path, inputs: list[str], rounds: int, max_tokens: int) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(inputs, handle)
    try:
        completed = subprocess.run(
            [sys.executable, __file__, "_offline", kind, str(model_path), handle.name, str(rounds), str(max_tokens)],
            capture_output=True, text=True, check=False, env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
        )
    finally:
        os.unlink(handle.name)
    if completed.returncode != 0:
        raise SystemExit(f"offline {kind} failed:\n{completed.stderr[-4000:]}")
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise SystemExit(f"offline {kind} printed no result:\n{completed.stdout[-4000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK):])
    return result


# ---- the service ---------------------------------------------------------------------------------
class Server:
    def __init__(self, model_path: Path, name: str, log_dir: Path, *extra: str) -> None:
        self.port = free_port()
        self.log_path = log_dir / f"inference-{name}.log"
        argv = [sys.executable, "-c", "from smallfirst.cli.main import main; main()", "inference",
                "--model-path", str(model_path), "--served-model-name", name, "--host", "127.0.0.1",
                "--port", str(self.port), "--metrics-port", "0", "--dtype", DTYPE, "--enforce-eager",
                "--kv-cache-space-gib", str(KV_CACHE_GIB), *extra]
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


def best_rate(items: int, seconds: list[float]) -> float:
    return items / min(seconds)


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
    parser.add_argument("--prompts", type=int, default=512, help="Banking77 texts used as generation prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from smallfirst.inference.models import bundled_embedding_model_path
    from smallfirst.inference.tiny_model import write_tiny_model

    catalog_task = load_catalog(default_catalog_path()).get("banking77_intent")
    seeds = {t for label in catalog_task.labels for t in label.examples} if catalog_task else set()
    with args.dataset.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["text"].strip() not in seeds]
    texts = [r["text"] for r in rows[: args.texts]]
    intents = [r["category"] for r in rows[: args.texts]]
    prompts = [r["text"] for r in rows[: args.prompts]]
    workdir = Path(tempfile.mkdtemp(prefix="bench-small-tier-"))
    embed_path = bundled_embedding_model_path()
    gen_path = write_tiny_model(workdir / GEN_MODEL, [args.dataset])
    result: dict[str, Any] = {"bench": "small_tier", "cpus": os.cpu_count(), "clients": args.clients,
                              "rounds": args.rounds}

    # -- embeddings
    print(f"embedding: offline, {len(texts)} texts", flush=True)
    offline = run_offline("embed", embed_path, texts, args.rounds, 0)
    server = Server(embed_path, EMBED_MODEL, workdir)
    try:
        requests = [pb.EmbedRequest(model=EMBED_MODEL, texts=[t]) for t in texts]
        asyncio.run(aio_pass(server.target, requests[:256], "Embed", args.clients))
        aio_seconds = []
        responses: list[Any] = []
        for _ in range(args.rounds):
            seconds, responses = asyncio.run(aio_pass(server.target, requests, "Embed", args.clients))
            aio_seconds.append(seconds)
        vectors = np.array([list(r.embeddings[0].values) for r in responses], dtype=np.float32)
        client = InferenceClient({EMBED_MODEL: server.target}, default_timeout_s=300)
        thread_seconds = []
        for _ in range(args.rounds):
            seconds, _ = threads_pass(client, texts, lambda t: client.embed(EMBED_MODEL, [t]), args.clients)
            thread_seconds.append(seconds)
        quality = classify_quality(vectors, intents, client)
        client.close()
    finally:
        server.stop()
    embed: dict[str, Any] = {
        "unit": "texts/s",
        "offline": round(best_rate(len(texts), offline["seconds"]), 1),
        "grpc_aio": round(best_rate(len(texts), aio_seconds), 1),
        "grpc_threads": round(best_rate(len(texts), thread_seconds), 1),
    }
    embed["ratio_grpc_aio"] = round(embed["grpc_aio"] / embed["offline"], 3)
    embed["ratio_grpc_threads"] = round(embed["grpc_threads"] / embed["offline"], 3)
    print(f"embedding: {embed}", flush=True)
    result["embedding"] = embed
    result["classification"] = quality

    # -- generation
    print(f"generation: offline, {len(prompts)} prompts x {args.max_tokens} tokens", flush=True)
    offline = run_offline("generate", gen_path, prompts, args.rounds, args.max_tokens)
    server = Server(gen_path, GEN_MODEL, workdir, "--load-format", "dummy", "--max-model-len", "4096")
    try:
        sampling = pb.SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
        gen_requests = [pb.GenerateRequest(model=GEN_MODEL, prompt=p, sampling=sampling) for p in prompts]
        asyncio.run(aio_pass(server.target, gen_requests[:64], "Generate", args.clients))
        aio_seconds, aio_tokens = [], []
        for _ in range(args.rounds):
            seconds, responses = asyncio.run(aio_pass(server.target, gen_requests, "Generate", args.clients))
            aio_seconds.append(seconds)
            aio_tokens.append(sum(r.usage.completion_tokens for r in responses))
        client = InferenceClient({GEN_MODEL: server.target}, default_timeout_s=300)
        thread_seconds, thread_tokens = [], []
        for _ in range(args.rounds):
            seconds, generations = threads_pass(
                client, prompts,
                lambda p: client.generate(GEN_MODEL, prompt=p, temperature=0.0, max_tokens=args.max_tokens),
                args.clients,
            )
            thread_seconds.append(seconds)
            thread_tokens.append(sum(g.completion_tokens for g in generations))
        client.close()
    finally:
        server.stop()

    def tokens_rate(tokens: list[int], seconds: list[float]) -> float:
        return max(t / s for t, s in zip(tokens, seconds, strict=True))

    generate: dict[str, Any] = {
        "unit": "generated tokens/s",
        "offline": round(tokens_rate(offline["tokens"], offline["seconds"]), 1),
        "grpc_aio": round(tokens_rate(aio_tokens, aio_seconds), 1),
        "grpc_threads": round(tokens_rate(thread_tokens, thread_seconds), 1),
        "offline_requests_per_s": round(best_rate(len(prompts), offline["seconds"]), 1),
        "grpc_aio_requests_per_s": round(best_rate(len(prompts), aio_seconds), 1),
        "tokens_per_request": round(statistics.mean(aio_tokens) / len(prompts), 1),
    }
    generate["ratio_grpc_aio"] = round(generate["grpc_aio"] / generate["offline"], 3)
    generate["ratio_grpc_threads"] = round(generate["grpc_threads"] / generate["offline"], 3)
    print(f"generation: {generate}", flush=True)
    result["generation"] = generate
    result["target_ratio"] = 0.85
    result["meets_target"] = min(embed["ratio_grpc_aio"], generate["ratio_grpc_aio"]) >= 0.85
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_offline":
        offline_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        main()

"""Routing quality of a classify task that learns, against the seed nearest-neighbour scorer.

    .venv/bin/python bench/routing.py [--messages 6000] [--chunk 100] [--frontier-error-share 0.0]

On the real stack (API, Redis, small and frontier pools, the inference service running vLLM on the
CPU, the frontier simulator answering as an oracle from the dataset's labels), with
../shared/datasets/banking77 only. Protocol:
- 10 of the 77 intents are held out of the catalog as out-of-scope: the frontier answers
  `out_of_scope` for their messages. The catalog's 67 intents carry their first 10 messages as
  seeds (and a description); `out_of_scope` has a description only.
- Two tasks with the same labels and seeds, measured in the same run on the same messages:
  `banking77_learn` learns (target_accuracy 0.97, out_of_scope_label, min_examples 0: its first
  head is trained on the seeds before the first job) and `banking77_seed` does not
  (the seed nearest-neighbour scorer with min_confidence 0.5, as the example catalog ships it).
  They bill different frontier models, so the simulator counts each one's frontier calls.
- The stream: the messages after each intent's seeds, interleaved across intents, submitted as
  jobs of both tasks through `POST /v1/jobs/batch`, `--chunk` messages at a time (the next chunk
  once the last one's jobs ended), so the trainer learns along the stream as it would in service.
- `--frontier-error-share`: the oracle answers that share of messages with a wrong label (drawn
  once), to show what a frontier's own errors do to learning; accuracy is always judged against
  the dataset's labels.

The last line is one JSON object: the learning task's figures, and `seed_scorer` with the same
figures for the seed scorer, plus their ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.tenants import TenantRegistry

REPO = Path(__file__).resolve().parent.parent
DATASET = REPO.parent / "shared" / "datasets" / "banking77"
SEEDS_PER_INTENT = 10
OUT_OF_SCOPE = "out_of_scope"
LEARN_TASK = "banking77_learn"
SEED_TASK = "banking77_seed"
# Different frontier models, so that the simulator's per-model counts are per task.
LEARN_FRONTIER_MODEL = "claude-haiku-5-5"
SEED_FRONTIER_MODEL = "claude-sonnet-5-5"
EMBED_MODEL = "all-minilm-l6-v2"


def load_dataset(dataset: Path) -> tuple[list[str], dict[str, list[str]]]:
    intents: list[str] = json.loads((dataset / "categories.json").read_text())
    per_intent: dict[str, list[str]] = defaultdict(list)
    with (dataset / "train.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            per_intent[row["category"]].append(row["text"].strip())
    return intents, per_intent


def stream_rows(intents: list[str], per_intent: dict[str, list[str]], count: int) -> list[tuple[str, str]]:
    """(text, intent) of the messages after each intent's seeds, interleaved across intents."""
    rest = {intent: per_intent[intent][SEEDS_PER_INTENT:] for intent in intents}
    rows: list[tuple[str, str]] = []
    depth = 0
    while len(rows) < count and any(depth < len(texts) for texts in rest.values()):
        for intent in intents:
            if depth < len(rest[intent]) and len(rows) < count:
                rows.append((rest[intent][depth], intent))
        depth += 1
    return rows


def catalog(in_scope: list[str], per_intent: dict[str, list[str]], args: argparse.Namespace) -> dict[str, Any]:
    labels = [{"name": intent, "description": "A customer message about: " + intent.replace("_", " ") + ".",
               "examples": per_intent[intent][:SEEDS_PER_INTENT]} for intent in in_scope]
    labels.append({"name": OUT_OF_SCOPE, "description": "A customer message about none of these intents."})
    base = {"kind": "classify", "max_input_chars": 2000, "labels": labels,
            "prompt": {"system": "You route customer-support messages of a bank to exactly one intent.\n"
                                 "The intents are: {labels}", "user": "Message: {text}"},
            "validators": [{"type": "min_confidence", "threshold": 0.5}],
            "small": {"model": EMBED_MODEL}}
    learning = {"enabled": True, "target_accuracy": args.target_accuracy, "out_of_scope_label": OUT_OF_SCOPE,
                "retrain_every": args.retrain_every, "min_examples": 0, "max_examples_per_label": 1000,
                "shadow_rate": args.shadow_rate}
    return {"tasks": [
        {**base, "name": LEARN_TASK, "learning": learning, "frontier": {"model": LEARN_FRONTIER_MODEL}},
        {**base, "name": SEED_TASK, "frontier": {"model": SEED_FRONTIER_MODEL}},
    ]}


def figures(ended: list[dict[str, Any]], truth: list[str], held_out: list[bool]) -> dict[str, Any]:
    def part(jobs: list[dict[str, Any]], labels: list[str]) -> tuple[float, float, float]:
        right = [j["status"] == "succeeded" and j["result"] == {"label": t} for j, t in zip(jobs, labels, strict=True)]
        kept = [j["status"] == "succeeded" and j["attempts"][-1]["tier"] == "small" for j in jobs]
        kept_right = [r for r, kp in zip(right, kept, strict=True) if kp]
        return (sum(right) / len(jobs), 1 - sum(kept) / len(jobs), sum(kept_right) / max(1, len(kept_right)))

    accuracy, frontier, kept_accuracy = part(ended, truth)
    third = len(ended) * 2 // 3
    last_accuracy, last_frontier, last_kept = part(ended[third:], truth[third:])

    def escalated(job: dict[str, Any]) -> bool:
        return not (job["status"] == "succeeded" and job["attempts"][-1]["tier"] == "small")

    oos = [j for j, h in zip(ended, held_out, strict=True) if h]
    ins = [j for j, h in zip(ended, held_out, strict=True) if not h]
    last_ins = [j for j, h in zip(ended[third:], held_out[third:], strict=True) if not h]
    return {
        "accuracy": round(accuracy, 4), "frontier_share": round(frontier, 4), "kept_accuracy": round(kept_accuracy, 4),
        "last_third_accuracy": round(last_accuracy, 4), "last_third_frontier_share": round(last_frontier, 4),
        "last_third_kept_accuracy": round(last_kept, 4),
        "oos_escalated": round(sum(1 for j in oos if escalated(j) or j.get("result") == {"label": OUT_OF_SCOPE})
                               / max(1, len(oos)), 4),
        "inscope_escalated": round(sum(1 for j in ins if escalated(j)) / max(1, len(ins)), 4),
        "last_third_inscope_escalated": round(sum(1 for j in last_ins if escalated(j)) / max(1, len(last_ins)), 4),
    }


def wait_all(client: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    ended = []
    for job_id in ids:
        while True:
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            if job["status"] in {"succeeded", "failed", "cancelled"}:
                ended.append(job)
                break
    return ended


def run(stack: Stack, rows: list[tuple[str, str]], chunk: int, truth: list[str],
        held_flags: list[bool]) -> dict[str, list[dict[str, Any]]]:
    tenant = TenantRegistry(redis.Redis.from_url(stack.redis_url)).create("bench")
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    jobs: dict[str, list[dict[str, Any]]] = {LEARN_TASK: [], SEED_TASK: []}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=120) as client:
        started = time.perf_counter()
        for start in range(0, len(rows), chunk):
            texts = [text for text, _ in rows[start:start + chunk]]
            body = {"jobs": [{"task": task, "input": {"text": text}} for text in texts
                             for task in (LEARN_TASK, SEED_TASK)]}
            response = client.post("/v1/jobs/batch", json=body)
            response.raise_for_status()
            ids = [item["job"]["id"] for item in response.json()["results"]]
            ended = wait_all(client, ids)
            jobs[LEARN_TASK].extend(ended[0::2])
            jobs[SEED_TASK].extend(ended[1::2])
            done = start + len(texts)
            if done % (chunk * 10) == 0 or done == len(rows):
                # The figures so far, so that a run cut short still tells something.
                print(json.dumps({"progress": done, "elapsed_s": round(time.perf_counter() - started),
                                  "learn": figures(jobs[LEARN_TASK], truth[:done], held_flags[:done]),
                                  "seed": figures(jobs[SEED_TASK], truth[:done], held_flags[:done])}), flush=True)
    return jobs


def protocol_arguments(description: str | None) -> argparse.ArgumentParser:
    """The protocol's options, shared with bench/routing_replay.py."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=6000)
    parser.add_argument("--chunk", type=int, default=100)
    parser.add_argument("--held-out-intents", type=int, default=10)
    parser.add_argument("--target-accuracy", type=float, default=0.97)
    parser.add_argument("--retrain-every", type=int, default=100)
    parser.add_argument("--frontier-error-share", type=float, default=0.0)
    # Shadow samples are frontier calls too (counted by the simulator, not in frontier_share).
    parser.add_argument("--shadow-rate", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=13)
    return parser


@dataclass
class Protocol:
    per_intent: dict[str, list[str]]
    held: set[str]  # the intents held out of the catalog (out of scope)
    in_scope: list[str]
    rows: list[tuple[str, str]]  # (text, intent) in stream order
    truth: list[str]  # the right answer of each row
    frontier_labels: list[str]  # what the frontier answers for each row
    wrong: int  # how many of those are wrong (--frontier-error-share)


def protocol(args: argparse.Namespace) -> Protocol:
    """The held-out intents, the stream and the frontier's answers, all drawn from `args.seed`."""
    rng = random.Random(args.seed)
    intents, per_intent = load_dataset(DATASET)
    held = set(rng.sample(intents, args.held_out_intents))
    in_scope = [i for i in intents if i not in held]
    rows = stream_rows(intents, per_intent, args.messages)
    truth = [OUT_OF_SCOPE if intent in held else intent for _, intent in rows]
    choices = [*in_scope, OUT_OF_SCOPE]
    answers = []
    for label in truth:
        if rng.random() < args.frontier_error_share:
            label = rng.choice([c for c in choices if c != label])
        answers.append(label)
    return Protocol(per_intent, held, in_scope, rows, truth, answers,
                    sum(a != t for a, t in zip(answers, truth, strict=True)))


def main() -> None:
    args = protocol_arguments(__doc__).parse_args()
    p = protocol(args)
    per_intent, held, in_scope, rows, truth = p.per_intent, p.held, p.in_scope, p.rows, p.truth

    from smallfirst.inference.models import bundled_embedding_model_path

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "catalog.yaml").write_text(yaml.safe_dump(catalog(in_scope, per_intent, args)))
        labels_path = workdir / "labels.csv"
        with labels_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for (text, _), label in zip(rows, p.frontier_labels, strict=True):
                writer.writerow([text, label])
        config = StackConfig(workdir=workdir, catalog_path=workdir / "catalog.yaml",
                             frontier_sim_args=["--strategy", "oracle", "--labels", str(labels_path)],
                             extra_env={"SMALLFIRST_TRAINER_INTERVAL_S": "2"})
        stack = Stack(config)
        try:
            stack.start_all(embed_model=bundled_embedding_model_path())
            started = time.perf_counter()
            jobs = run(stack, rows, args.chunk, truth, [intent in held for _, intent in rows])
            elapsed_s = time.perf_counter() - started
            assert stack.frontier_base_url is not None
            sim = httpx.get(f"{stack.frontier_base_url}/_sim/stats", timeout=10).json()
            store = redis.Redis.from_url(stack.redis_url)
            published = store.get(k.head_published_key(LEARN_TASK, EMBED_MODEL))
            trainings = store.get(k.head_next_version_key(LEARN_TASK, EMBED_MODEL))
            head_meta = store.hget(k.head_key(LEARN_TASK, EMBED_MODEL), "meta")
        finally:
            stack.stop_all()
    held_flags = [intent in held for _, intent in rows]
    learned = figures(jobs[LEARN_TASK], truth, held_flags)
    seed = figures(jobs[SEED_TASK], truth, held_flags)
    by_model = sim.get("requests_by_model", {})
    learned["frontier_share_by_simulator"] = round(by_model.get(LEARN_FRONTIER_MODEL, 0) / len(rows), 4)
    seed["frontier_share_by_simulator"] = round(by_model.get(SEED_FRONTIER_MODEL, 0) / len(rows), 4)
    # Heads that went live; trainings counts every head trained, published or not.
    learned["model_versions"] = int(published) if published is not None else 0
    learned["model_trainings"] = int(trainings) if trainings is not None else 0
    meta = json.loads(head_meta) if head_meta else {}
    learned["live_head"] = {"version": meta.get("version"), "threshold": meta.get("threshold"),
                            "novelty_floor": meta.get("novelty_floor"), "metrics": meta.get("metrics")}
    ratios = {key: round(learned[key] / seed[key], 4) if seed[key] else None
              for key in ("accuracy", "frontier_share", "kept_accuracy", "last_third_frontier_share")}
    print(f"learning: accuracy {learned['accuracy']:.3f} with {learned['frontier_share']:.1%} to the frontier "
          f"({learned['last_third_frontier_share']:.1%} over the last third); seed scorer: accuracy "
          f"{seed['accuracy']:.3f} with {seed['frontier_share']:.1%} ({seed['last_third_frontier_share']:.1%})",
          flush=True)
    print(json.dumps({"bench": "routing", "messages": len(rows), "chunk": args.chunk,
                      "held_out_intents": sorted(held), "frontier_error_share": args.frontier_error_share,
                      "frontier_wrong_labels": p.wrong, "elapsed_s": round(elapsed_s, 1), **learned,
                      "seed_scorer": seed, "learned_vs_seed": ratios}))


if __name__ == "__main__":
    main()

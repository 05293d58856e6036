"""bench/routing.py's protocol replayed offline on the trainer's own code, in minutes instead of an hour.

    .venv/bin/python bench/routing_replay.py [--messages 6000] [--chunk 100] [--embeddings PATH]

What it keeps of the real run: the same catalog (67 intents with 10 seeds and a description,
`out_of_scope` with a description), the same held-out intents and stream order, vLLM's embeddings of
every text (computed once with the inference service's engine settings and cached in --embeddings),
the seed scorer as the small worker runs it (best similarity per label, softmax at 0.05,
min_confidence 0.5), a trained head's gate (threshold and novelty floor), the example memory's
contents (every escalation's frontier answer), the recent-input list, and the trainer's `train_head`,
publish rule and guard, run every `retrain_every` new examples (and on the seeds alone before the
first chunk, as the catalog's `min_examples` is 0). What it leaves out: Redis, the API,
the workers and the head's propagation delay (a head goes live for the chunk after its training),
so it is a tool for choosing the head's method, and bench/routing.py stays the measurement.

The last line is one JSON object with bench/routing.py's keys for the learning task and the seed
scorer, measured on the same stream.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.routing import (
    LEARN_TASK,
    OUT_OF_SCOPE,
    catalog,
    protocol,
    protocol_arguments,
)
from smallfirst.common import constants as k
from smallfirst.common.catalog import load_catalog
from smallfirst.common.examples import ExampleSource
from smallfirst.inference.dtypes import platform_dtype
from smallfirst.small_worker import trainer as tr
from smallfirst.small_worker.heads import TrainedHead, unit_rows
from smallfirst.small_worker.label_index import label_texts

if TYPE_CHECKING:
    from vllm.config.model import ModelDType

SEED_TEMPERATURE = 0.05
SEED_MIN_CONFIDENCE = 0.5


def embeddings(texts: list[str], path: Path, dtype: str) -> dict[str, np.ndarray]:
    cached: dict[str, np.ndarray] = {}
    if path.exists():
        data = np.load(path, allow_pickle=False)
        cached = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
    missing = [t for t in dict.fromkeys(texts) if t not in cached]
    if missing:
        from vllm import LLM

        from smallfirst.inference.models import bundled_embedding_model_path

        llm = LLM(model=str(bundled_embedding_model_path()), runner="pooling", enforce_eager=True,
                  dtype=cast("ModelDType", dtype), kv_cache_memory_bytes=2**30)
        for text, output in zip(missing, llm.embed(missing), strict=True):
            cached[text] = np.asarray(output.outputs.embedding, dtype=np.float32)
        # The engine's processes now, not at the interpreter's exit, where they held the replay
        # alive after its last line (its training threads and vLLM's shutdown hooks crossed).
        llm.llm_engine.engine_core.shutdown()
        del llm
        names = list(cached)
        np.savez(path, texts=np.array(names), vectors=np.stack([cached[t] for t in names]))
    return cached


def figures(right: list[bool], kept: list[bool], held: list[bool], said_oos: list[bool]) -> dict[str, Any]:
    def part(lo: int, hi: int) -> tuple[float, float, float]:
        r, kp = right[lo:hi], kept[lo:hi]
        kr = [a for a, b in zip(r, kp, strict=True) if b]
        return sum(r) / len(r), 1 - sum(kp) / len(kp), sum(kr) / max(1, len(kr))

    n = len(right)
    acc, fs, ka = part(0, n)
    la, lf, lk = part(n * 2 // 3, n)
    oos = [not kp or s for kp, s, h in zip(kept, said_oos, held, strict=True) if h]
    ins = [not kp for kp, h in zip(kept, held, strict=True) if not h]
    last_ins = [not kp for kp, h in zip(kept[n * 2 // 3:], held[n * 2 // 3:], strict=True) if not h]
    return {"accuracy": round(acc, 4), "frontier_share": round(fs, 4), "kept_accuracy": round(ka, 4),
            "last_third_accuracy": round(la, 4), "last_third_frontier_share": round(lf, 4),
            "last_third_kept_accuracy": round(lk, 4),
            "oos_escalated": round(sum(oos) / max(1, len(oos)), 4),
            "inscope_escalated": round(sum(ins) / max(1, len(ins)), 4),
            "last_third_inscope_escalated": round(sum(last_ins) / max(1, len(last_ins)), 4)}


def main() -> None:
    parser = protocol_arguments(__doc__)
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="the vectors' cache (default /tmp/smallfirst-banking77-embeddings-DTYPE.npz)")
    parser.add_argument("--confidence-level", type=float, default=None)
    parser.add_argument("--verbose", action="store_true")
    # Saves the training data, recent inputs and the next 1,000 messages at training N, and stops,
    # for looking at one training closely.
    parser.add_argument("--dump-at", type=int, default=0)
    parser.add_argument("--dump-path", type=Path, default=Path("/tmp/smallfirst-routing-replay.npz"))
    # Tries another value of one of the trainer's constants (repeatable), e.g. --set FOLDS=10.
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        if not hasattr(tr, name):
            parser.error(f"--set: the trainer has no constant {name}")
        setattr(tr, name, type(getattr(tr, name))(value))
    drawn = protocol(args)
    per_intent, in_scope, rows, truth = drawn.per_intent, drawn.in_scope, drawn.rows, drawn.truth
    frontier_label = drawn.frontier_labels
    held = [intent in drawn.held for _, intent in rows]
    rng = random.Random(args.seed + 1)  # shadow draws
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.yaml"
        path.write_text(yaml.safe_dump(catalog(in_scope, per_intent, args)))
        task = load_catalog(path).get(LEARN_TASK)
    assert task is not None
    if args.confidence_level is not None:
        task = task.model_copy(update={"learning": task.learning.model_copy(
            update={"confidence_level": args.confidence_level})})

    seed_texts = [t for label in task.labels for t in label_texts(label)]
    # The inference service's default dtype on this machine.
    dtype = platform_dtype().dtype
    cache = args.embeddings or Path(f"/tmp/smallfirst-banking77-embeddings-{dtype}.npz")
    vectors = embeddings(seed_texts + [text for text, _ in rows], cache, dtype)
    names = task.label_names
    index = {name: i for i, name in enumerate(names)}
    seed_x = unit_rows(np.stack([vectors[t] for t in seed_texts]))
    seed_y = np.array([index[label.name] for label in task.labels for _ in label_texts(label)])
    seed_sources = np.array([ExampleSource.SEED.value if t in label.examples else "description"
                             for label in task.labels for t in label_texts(label)])
    stream_x = unit_rows(np.stack([vectors[text] for text, _ in rows]))
    stream_y = np.array([index[t] for t in truth])

    def seed_scores(x: np.ndarray) -> np.ndarray:
        sims = x @ seed_x.T
        best = np.full((len(x), len(names)), -1.0)
        for c in range(len(names)):
            best[:, c] = sims[:, seed_y == c].max(axis=1)
        z = best / SEED_TEMPERATURE
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        result: np.ndarray = e / e.sum(axis=1, keepdims=True)
        return result

    # The seed scorer on the whole stream (it does not learn).
    seed_p = seed_scores(stream_x)
    seed_pred, seed_conf = seed_p.argmax(axis=1), seed_p.max(axis=1)
    seed_kept = seed_conf >= SEED_MIN_CONFIDENCE
    seed_right = np.where(seed_kept, seed_pred == stream_y, True)
    seed_fig = figures(seed_right.tolist(), seed_kept.tolist(), held,
                       (seed_kept & (seed_pred == index[OUT_OF_SCOPE])).tolist())

    examples_x: list[np.ndarray] = []
    examples_y: list[int] = []
    examples_src: list[str] = []
    examples_t: list[float] = []
    recent: list[np.ndarray] = []
    live: TrainedHead | None = None
    trained_at_added: int | None = None  # examples at the last training; None: never trained
    versions = published = 0
    right: list[bool] = []
    kept: list[bool] = []
    said_oos: list[bool] = []
    log: list[dict[str, Any]] = []
    clock = 1.0
    started = time.perf_counter()
    def train(end: int) -> None:
        nonlocal trained_at_added, versions, published, live
        added = len(examples_y)
        # As `Trainer.due`: a task never trained waits for `min_examples` (0: trained on the seeds
        # before the first job), then trains every `retrain_every` new examples.
        due = (added >= task.learning.min_examples if trained_at_added is None
               else added - trained_at_added >= task.learning.retrain_every)
        if not due:
            return
        trained_at_added = added
        versions += 1
        learned_x = np.stack(examples_x) if examples_x else np.zeros((0, seed_x.shape[1]), dtype=np.float32)
        recent_x = np.stack(recent) if recent else None
        data = tr.TrainingData(
            x=np.concatenate([seed_x, learned_x]).astype(np.float32),
            y=np.concatenate([seed_y, np.array(examples_y, dtype=np.int64)]),
            sources=np.concatenate([seed_sources, examples_src]),
            created_at=np.concatenate([np.zeros(len(seed_y)), np.array(examples_t, dtype=np.float64)]), classes=names)
        if args.dump_at and versions == args.dump_at:
            future = slice(end, end + 1000)
            np.savez(args.dump_path, x=data.x, y=data.y, sources=data.sources, created_at=data.created_at,
                     recent=recent_x if recent_x is not None else np.zeros((0, seed_x.shape[1])),
                     recent_y=stream_y[max(0, end - len(recent)):end][::-1],
                     future_x=stream_x[future], future_y=stream_y[future], classes=np.array(names))
            if live is not None:
                import pickle

                args.dump_path.with_suffix(".live.pickle").write_bytes(pickle.dumps(live))
            raise SystemExit(0)
        head, metrics = tr.train_head(data, task, live, version=versions, recent_inputs=recent_x, now=clock)
        go = metrics["calibration_kept_share"] > 0.0 and not (
            live is not None and metrics.get("live_fresh_accuracy") is not None and tr.worse_than_live(metrics))
        if go:
            live = head
            published += 1
        # What this head would have done on the next chunks, for the log.
        entry = {"at": end, "version": versions, "live": go, "threshold": metrics["threshold"],
                 "expected_share": metrics.get("expected_frontier_share"), "floor": metrics["novelty_floor"],
                 "examples": metrics["examples"], "training_s": metrics["training_s"],
                 "held_out_accuracy": metrics["held_out_accuracy"], "sharpness": metrics.get("sharpness"),
                 "share_so_far": round(1 - sum(kept[-args.chunk * 5:]) / max(1, len(kept[-args.chunk * 5:])), 3)}
        if args.verbose and end < len(rows):
            # Diagnosis only (the future is not the trainer's to see): what the head does on the next
            # messages, and the threshold an oracle would choose there for the target.
            future = slice(end, min(len(rows), end + 1000))
            p_f, n_f = head.scores(stream_x[future])
            c_f, ok_f = p_f.max(axis=1), p_f.argmax(axis=1) == stream_y[future]
            keep_f = (c_f >= head.threshold) & (n_f <= head.novelty_floor)
            entry["next_share"] = round(1 - float(keep_f.mean()), 3)
            entry["next_kept_acc"] = round(float(ok_f[keep_f].mean()), 4) if keep_f.any() else None
            order = np.argsort(-c_f)
            acc = np.cumsum(ok_f[order]) / np.arange(1, len(order) + 1)
            good = np.flatnonzero(acc >= args.target_accuracy)
            if len(good):
                t_star = float(c_f[order][good[-1]])
                entry["oracle_threshold"] = round(t_star, 3)
                entry["oracle_share"] = round(1 - float(((c_f >= t_star) & (n_f <= head.novelty_floor)).mean()), 3)
            entry["novelty_escalated"] = round(float((n_f > head.novelty_floor).mean()), 3)
        log.append(entry)
        if args.verbose:
            print(json.dumps(entry), flush=True)

    for start in range(0, len(rows), args.chunk):
        train(start)
        end = min(len(rows), start + args.chunk)
        x = stream_x[start:end]
        if live is not None:
            probabilities, novelty = live.scores(x)
            pred, conf = probabilities.argmax(axis=1), probabilities.max(axis=1)
            keep = (conf >= live.threshold) & (novelty <= live.novelty_floor)
        else:
            p = seed_scores(x)
            pred, conf = p.argmax(axis=1), p.max(axis=1)
            keep = conf >= SEED_MIN_CONFIDENCE
        for j in range(end - start):
            i = start + j
            clock += 1.0
            recent.insert(0, stream_x[i])
            if keep[j]:
                right.append(bool(pred[j] == stream_y[i]))
                kept.append(True)
                said_oos.append(bool(pred[j] == index[OUT_OF_SCOPE]))
                if args.shadow_rate and rng.random() < args.shadow_rate:
                    examples_x.append(stream_x[i])
                    examples_y.append(index[frontier_label[i]])
                    examples_src.append(ExampleSource.SHADOW.value)
                    examples_t.append(clock)
            else:
                right.append(frontier_label[i] == truth[i])
                kept.append(False)
                said_oos.append(False)
                examples_x.append(stream_x[i])
                examples_y.append(index[frontier_label[i]])
                examples_src.append(ExampleSource.FRONTIER.value)
                examples_t.append(clock)
        del recent[k.RECENT_INPUTS_KEPT:]
    learned = figures(right, kept, held, said_oos)
    learned["model_versions"] = published
    learned["model_trainings"] = versions
    print(json.dumps({"bench": "routing_replay", "messages": len(rows), "elapsed_s": round(time.perf_counter()
                                                                                            - started, 1),
                      **learned, "seed_scorer": seed_fig}))


if __name__ == "__main__":
    main()

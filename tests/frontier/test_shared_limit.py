"""Two frontier worker processes sharing one requests-per-window limit never exceed it together."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from smallfirst.common.catalog import default_catalog_path
from tests.frontier_fixtures import SimControl
from tests.support.procs import ManagedProcess, wait_until

MODEL = "claude-haiku-5-5"
LIMIT = 4
WINDOW_S = 2.0
JOBS_PER_PROCESS = 8
# The limiter admits by Redis's clock; the simulator stamps arrival a little later, by a delay that
# varies per request. A window measured at the simulator is shortened by this much to absorb that.
ARRIVAL_SKEW_S = 0.3


def test_two_processes_sharing_a_limit_never_exceed_it_together(frontier_sim: SimControl, redis_url: str,
                                                                 logs_dir: Path, tmp_path: Path) -> None:
    # given
    env = {
        "SMALLFIRST_REDIS_URL": redis_url,
        "SMALLFIRST_CATALOG_PATH": str(default_catalog_path()),
        "SMALLFIRST_ANTHROPIC_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        "SMALLFIRST_FRONTIER_SIM_URL": frontier_sim.url,
        "SMALLFIRST_FRONTIER_RATE_LIMITS": json.dumps({MODEL: {"requests_per_min": LIMIT, "window_s": WINDOW_S}}),
    }
    start_at = time.time() + 4.0
    outs = [tmp_path / f"worker-{n}.json" for n in (1, 2)]
    workers = [
        ManagedProcess(f"limit-worker-{n}", [sys.executable, "-m", "tests.frontier.shared_limit_client",
                                             "--jobs", str(JOBS_PER_PROCESS), "--start-at", str(start_at),
                                             "--out", str(out)], logs_dir, env=env,
                       cwd=Path(__file__).resolve().parents[2]).start()
        for n, out in zip((1, 2), outs, strict=True)
    ]

    # when
    try:
        wait_until(lambda: not any(w.alive() for w in workers), timeout_s=120, what="both workers to finish")
    finally:
        for worker in workers:
            worker.stop()
    for worker in workers:
        assert worker.proc is not None
        assert worker.proc.returncode == 0, worker.tail()
    results = [json.loads(out.read_text())["calls"] for out in outs]

    # then: the simulator saw every job once
    arrivals = sorted(entry["t"] for entry in frontier_sim.requests(MODEL))
    assert len(arrivals) == 2 * JOBS_PER_PROCESS
    # and the two processes ran at the same time, so the limit was shared, not taken in turns
    spans = [(calls[0]["started"], calls[-1]["started"]) for calls in results]
    assert max(s for s, _ in spans) < min(e for _, e in spans)
    # and no window held more than the limit
    for index, first in enumerate(arrivals):
        in_window = [t for t in arrivals[index:] if t < first + WINDOW_S - ARRIVAL_SKEW_S]
        assert len(in_window) <= LIMIT, f"{len(in_window)} requests within {WINDOW_S} s from {first}"
    # and the limiter made both processes wait for it
    assert all(sum(call["limiter_wait_s"] for call in calls) > 0 for calls in results)

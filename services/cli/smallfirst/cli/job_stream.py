"""A stream of jobs through a running stack's API while a fault happens, and the audit of what became
of every accepted job: the harness of the fault-injection tests (tests/faults) and of bench/chaos.py.

No pytest here: the benchmark imports it too.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

TERMINAL = {"succeeded", "failed", "cancelled"}

# Frontier-routed jobs need no inference server (cheap tests); classify jobs run on the small tier.
FRONTIER_JOB: dict[str, Any] = {"task": "email_summary",
                                "input": {"text": "Hi, could you move our call to Thursday? Thanks, Ana"}}
SMALL_JOB: dict[str, Any] = {"task": "banking77_intent", "input": {"text": "I am still waiting on my card?"}}


@dataclass
class StreamReport:
    """What happened to a stream's submissions. `accepted` got a 202; `refused` any other answer or
    none (the client would retry them, with their idempotency key); of the accepted: `ended` reached
    a terminal status, `stuck` never did, `lost` were unknown (404) after their 202, `duplicates`
    had more than one answer accepted, `double_billed` were billed more than once on one tier for
    anything but a rejected answer (a rejected answer is paid for and then asked again, rightly)."""

    accepted: int = 0
    refused: int = 0
    ended: int = 0
    stuck: int = 0
    lost: int = 0
    duplicates: int = 0
    double_billed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    stuck_jobs: list[dict[str, Any]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def figures(self) -> dict[str, int]:
        return {"accepted": self.accepted, "ended": self.ended, "stuck": self.stuck, "lost": self.lost,
                "duplicates": self.duplicates, "double_billed": self.double_billed}

    @property
    def clean(self) -> bool:
        return self.accepted == self.ended and not (self.stuck or self.lost or self.duplicates or self.double_billed)


def job_defects(job: dict[str, Any]) -> tuple[bool, bool]:
    """(answered twice, billed twice) for one ended job record."""
    attempts = job.get("attempts", [])
    accepted = sum(1 for a in attempts if a.get("outcome") == "accepted")
    billed: Counter[str] = Counter(a["tier"] for a in attempts if a.get("billed") and a.get("outcome") != "rejected")
    return accepted > 1, any(count > 1 for count in billed.values())


class JobStream:
    """Submits `count` jobs at `rate_per_s`, cycling through `bodies`; `at_job` (index -> callable)
    runs a fault on a thread of its own when that many jobs have been sent, so the stream goes on
    while the fault lasts."""

    def __init__(self, api_url: str, api_key: str, bodies: Sequence[dict[str, Any]], *, count: int,
                 rate_per_s: float, timeout_s: float = 10.0) -> None:
        self.api_url = api_url
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.bodies = list(bodies)
        self.count = count
        self.rate_per_s = rate_per_s
        self.timeout_s = timeout_s
        self.accepted: list[str] = []
        self.refused: Counter[str] = Counter()
        self.faults: list[threading.Thread] = []

    def run(self, at_job: dict[int, Callable[[], None]] | None = None) -> None:
        at_job = dict(at_job or {})
        started = time.monotonic()
        with httpx.Client(base_url=self.api_url, headers=self.headers, timeout=self.timeout_s) as client:
            for index in range(self.count):
                if index in at_job:
                    thread = threading.Thread(target=at_job.pop(index), name=f"fault-{index}", daemon=True)
                    thread.start()
                    self.faults.append(thread)
                due = started + index / self.rate_per_s
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                body = self.bodies[index % len(self.bodies)]
                try:
                    response = client.post("/v1/jobs", json=body)
                except httpx.HTTPError as exc:
                    self.refused[type(exc).__name__] += 1
                    continue
                if response.status_code == 202:
                    self.accepted.append(response.json()["id"])
                else:
                    self.refused[str(response.status_code)] += 1
        for thread in self.faults:
            thread.join()

    def audit(self, settle_s: float, poll_interval_s: float = 1.0) -> StreamReport:
        """Wait up to `settle_s` for every accepted job to end, then classify each."""
        report = StreamReport(accepted=len(self.accepted), refused=sum(self.refused.values()))
        pending = set(self.accepted)
        ended: dict[str, dict[str, Any]] = {}
        lost: set[str] = set()
        last_seen: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + settle_s
        with httpx.Client(base_url=self.api_url, headers=self.headers, timeout=self.timeout_s) as client:
            while pending:
                for job_id in sorted(pending):
                    try:
                        response = client.get(f"/v1/jobs/{job_id}")
                    except httpx.HTTPError:
                        continue
                    if response.status_code == 404:
                        lost.add(job_id)
                        continue
                    if response.status_code != 200:
                        continue
                    job = response.json()
                    last_seen[job_id] = job
                    if job["status"] in TERMINAL:
                        ended[job_id] = job
                        lost.discard(job_id)
                pending -= set(ended)
                # A 404 is final only once Redis answered for the job again at the end (it may
                # have been read while Redis was replaying its AOF).
                if not pending - lost or time.monotonic() > deadline:
                    break
                time.sleep(poll_interval_s)
        report.ended = len(ended)
        report.lost = len(lost - set(ended))
        stuck = pending - lost
        report.stuck = len(stuck)
        report.stuck_jobs = [last_seen.get(job_id, {"id": job_id}) for job_id in sorted(stuck)][:10]
        for job in ended.values():
            report.statuses[job["status"]] += 1
            if job.get("error"):
                report.errors[job["error"]["code"]] += 1
            twice_answered, twice_billed = job_defects(job)
            report.duplicates += twice_answered
            report.double_billed += twice_billed
        return report

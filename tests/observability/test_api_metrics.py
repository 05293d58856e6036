"""The /metrics of a real `smallfirst api` process: what it counts, and that Prometheus' own promtool
accepts its exposition."""

from __future__ import annotations

import re
import subprocess

import httpx

from smallfirst.common import constants as k
from tests.support.procs import require_binary

BANKING = {"task": "banking77_intent", "input": {"text": "My card has not arrived yet."}}


def promtool_check(exposition: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_binary("promtool"), "check", "metrics"], input=exposition, capture_output=True,
                          text=True, timeout=30, check=False)


def sample(exposition: str, series: str) -> float | None:
    """The value of one exact series (`name{labels}` as exposed), or None when it is absent."""
    match = re.search(rf"^{re.escape(series)} (\S+)$", exposition, re.MULTILINE)
    return None if match is None else float(match.group(1))


def test_api_metrics_count_submissions_cancels_and_queue_depth_and_pass_promtool(api_client: httpx.Client) -> None:
    # given three jobs submitted (one alone, two in a batch), and one of them cancelled
    first = api_client.post("/v1/jobs", json=BANKING)
    batch = api_client.post("/v1/jobs/batch", json={"jobs": [BANKING, BANKING]})
    cancelled = api_client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    assert (first.status_code, batch.status_code, cancelled.status_code) == (202, 202, 200)

    # when Prometheus scrapes the API
    response = api_client.get("/metrics")
    text = response.text

    # then the submissions, the cancel and the three waiting messages are there, in a valid exposition
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""
    assert response.headers["content-type"].startswith("text/plain")
    assert sample(text, 'smallfirst_jobs_submitted_total{task="banking77_intent",tier="small"}') == 3
    assert sample(text, 'smallfirst_jobs_ended_total{status="cancelled",task="banking77_intent",tier="small"}') == 1
    assert sample(text, 'smallfirst_job_duration_seconds_count{phase="submit_to_result",tier="small"}') == 1
    assert sample(text, f'smallfirst_queue_length{{queue="{k.QUEUE_SMALL}"}}') == 3
    assert sample(text, f'smallfirst_queue_length{{queue="{k.QUEUE_ESCALATION}"}}') == 0
    assert sample(text, "smallfirst_queue_redis_up") == 1
    assert sample(text, "smallfirst_unacked_messages") == 0
    assert sample(text, "process_resident_memory_bytes") is not None


def test_api_metrics_speak_openmetrics_to_a_scraper_that_asks(api_client: httpx.Client) -> None:
    # given a submitted job
    api_client.post("/v1/jobs", json=BANKING)

    # when the scraper prefers OpenMetrics
    response = api_client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})

    # then it gets OpenMetrics, with the same counter
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
    assert 'smallfirst_jobs_submitted_total{task="banking77_intent",tier="small"} 1.0' in response.text

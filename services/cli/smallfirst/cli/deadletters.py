"""`smallfirst dead-letters list|replay|undecodable`: a tenant's dead letters from a shell.

`list` and `replay` go through the API as the tenant (SMALLFIRST_API_URL, SMALLFIRST_API_KEY), so
a replay is published and counted exactly as one from the API; `undecodable` is for operators and
reads the queue messages no worker could decode straight from Redis (they belong to no tenant).
"""

from __future__ import annotations

import json
from typing import Any

import click
import httpx

from smallfirst.cli.client import API_KEY_OPTION, API_URL_OPTION, _client, _print_or_fail
from smallfirst.cli.tenants import redis_url_option


@click.group(name="dead-letters")
def command() -> None:
    """Jobs that failed for a reason a person can act on, and how to run them again."""


@command.command(name="list")
@API_URL_OPTION
@API_KEY_OPTION
@click.option("--reason", default=None, help="Only this reason (deadline_exceeded, frontier_rejected, ...).")
@click.option("--failed-after", default=None, help="Failed at or after (ISO 8601 or Unix s).")
@click.option("--failed-before", default=None, help="Failed before (ISO 8601 or Unix s).")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True, help="Entries per page.")
@click.option("--all", "all_pages", is_flag=True, help="Follow the cursor through every page.")
def list_command(api_url: str, api_key: str, reason: str | None, failed_after: str | None,
                 failed_before: str | None, limit: int, all_pages: bool) -> None:
    """Print the tenant's dead letters as JSON lines, newest first."""
    params: dict[str, Any] = {"limit": limit, "reason": reason, "failed_after": failed_after,
                              "failed_before": failed_before}
    with _client(api_url, api_key) as client:
        while True:
            response = client.get("/v1/dead-letters", params={k: v for k, v in params.items() if v is not None})
            page = _checked(response)
            for entry in page["data"]:
                click.echo(json.dumps(entry, ensure_ascii=False))
            if not all_pages or not page["has_more"]:
                return
            params["cursor"] = page["next_cursor"]


@command.command()
@API_URL_OPTION
@API_KEY_OPTION
@click.argument("job_ids", nargs=-1)
@click.option("--reason", default=None, help="Replay every entry with this reason (instead of JOB_IDS).")
@click.option("--failed-after", type=float, default=None, help="With --reason: failed at or after (Unix s).")
@click.option("--failed-before", type=float, default=None, help="With --reason: failed before (Unix s).")
@click.option("--deadline-s", type=float, default=None, help="Deadline of the new run (default: the job's own).")
def replay(api_url: str, api_key: str, job_ids: tuple[str, ...], reason: str | None, failed_after: float | None,
           failed_before: float | None, deadline_s: float | None) -> None:
    """Replay dead-lettered jobs: the JOB_IDS given, or all that match --reason and the time range."""
    if bool(job_ids) == (reason is not None or failed_after is not None or failed_before is not None):
        raise click.UsageError("give JOB_IDS, or --reason / --failed-after / --failed-before, not both")
    with _client(api_url, api_key) as client:
        if job_ids:
            body = {"deadline_s": deadline_s} if deadline_s is not None else None
            for job_id in job_ids:
                _print_or_fail(client.post(f"/v1/jobs/{job_id}/replay", json=body))
            return
        request: dict[str, Any] = {"reason": reason, "failed_after": failed_after, "failed_before": failed_before,
                                   "limit": 1000, "deadline_s": deadline_s}
        request = {k: v for k, v in request.items() if v is not None}
        replayed = 0
        while True:
            result = _checked(client.post("/v1/dead-letters/replay", json=request))
            replayed += len(result["replayed"])
            for job_id in result["replayed"]:
                click.echo(job_id)
            # Every call replays what it found; what is left was added meanwhile or failed again.
            if not result["has_more"] or not result["replayed"]:
                break
        click.echo(f"replayed {replayed} job(s)", err=True)


@command.command()
@redis_url_option
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
def undecodable(redis_url: str, limit: int) -> None:
    """Print the queue messages no worker could decode (operators; reads Redis)."""
    import redis

    from smallfirst.common import constants as k
    from smallfirst.common.deadletters import read_entries

    client = redis.Redis.from_url(redis_url)
    for entry in read_entries(client, k.UNDECODABLE_MESSAGES_TENANT, limit=limit):
        click.echo(entry.model_dump_json())


def _checked(response: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = response.json()
    except json.JSONDecodeError:
        raise click.ClickException(f"HTTP {response.status_code}: {response.text[:500]}") from None
    if response.status_code >= 400:
        error = body.get("error", {})
        raise click.ClickException(f"HTTP {response.status_code} {error.get('code')}: {error.get('message')}")
    return body

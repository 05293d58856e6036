"""`smallfirst submit` and `smallfirst get`: the API from a shell (SMALLFIRST_API_URL, SMALLFIRST_API_KEY)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
import httpx

API_URL_OPTION = click.option("--api-url", envvar="SMALLFIRST_API_URL", default="http://127.0.0.1:8000",
                              show_default=True, help="Base URL of the ingest API.")
API_KEY_OPTION = click.option("--api-key", envvar="SMALLFIRST_API_KEY", required=True,
                              help="The tenant's API key (or SMALLFIRST_API_KEY).")


def _client(api_url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=75)


def _print_or_fail(response: httpx.Response) -> dict[str, Any]:
    try:
        body: dict[str, Any] = response.json()
    except json.JSONDecodeError:
        raise click.ClickException(f"HTTP {response.status_code}: {response.text[:500]}") from None
    if response.status_code >= 400:
        error = body.get("error", {})
        raise click.ClickException(f"HTTP {response.status_code} {error.get('code')}: {error.get('message')}")
    click.echo(json.dumps(body, indent=2, ensure_ascii=False))
    return body


@click.command()
@API_URL_OPTION
@API_KEY_OPTION
@click.option("--task", required=True, help="Task name from the catalog (GET /v1/tasks).")
@click.option("--text", default=None, help="The input's `text` field; '-' reads standard input.")
@click.option("--input", "input_json", default=None, help="The whole input as a JSON object.")
@click.option("--tier", type=click.Choice(["auto", "small", "frontier"]), default="auto", show_default=True)
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default="normal", show_default=True)
@click.option("--local-only", is_flag=True, help="Never send this job to the frontier tier.")
@click.option("--callback-url", default=None)
@click.option("--idempotency-key", default=None)
@click.option("--wait", "wait_s", type=click.IntRange(0, 60), default=0, help="Long-poll up to this many seconds.")
def submit(api_url: str, api_key: str, task: str, text: str | None, input_json: str | None, tier: str,
           priority: str, local_only: bool, callback_url: str | None, idempotency_key: str | None,
           wait_s: int) -> None:
    """Submit a job and print it (with --wait, print it once it has ended)."""
    if (text is None) == (input_json is None):
        raise click.UsageError("give exactly one of --text and --input")
    if input_json is not None:
        try:
            job_input = json.loads(input_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from exc
    else:
        job_input = {"text": sys.stdin.read() if text == "-" else text}
    body: dict[str, Any] = {"task": task, "input": job_input, "tier": tier, "priority": priority,
                            "local_only": local_only}
    if callback_url:
        body["callback_url"] = callback_url
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    with _client(api_url, api_key) as client:
        response = client.post("/v1/jobs", json=body, headers=headers)
        if wait_s and response.status_code == 202:
            response = client.get(f"/v1/jobs/{response.json()['id']}", params={"wait": wait_s})
        _print_or_fail(response)


@click.command()
@API_URL_OPTION
@API_KEY_OPTION
@click.argument("job_id")
@click.option("--wait", "wait_s", type=click.IntRange(0, 60), default=0, help="Long-poll up to this many seconds.")
def get(api_url: str, api_key: str, job_id: str, wait_s: int) -> None:
    """Print a job."""
    with _client(api_url, api_key) as client:
        params = {"wait": wait_s} if wait_s else {}
        _print_or_fail(client.get(f"/v1/jobs/{job_id}", params=params))

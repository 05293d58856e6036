"""`smallfirst tenant`: create tenants, list them, change their limits and budgets, rotate their API keys.

Output is JSON so scripts (and `smallfirst dev`) can read it. The plaintext API key is printed
once, by `create` and `rotate-key`; only its SHA-256 is stored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import redis

from smallfirst.common.budgets import BudgetLedger
from smallfirst.common.jobs import FrontierMode
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
@click.option("--frontier-mode", type=click.Choice([m.value for m in FrontierMode]), default=None,
              help="How this tenant's frontier attempts are sent when a job does not say (default: the task's).")
@redis_url_option
def create(name: str, tenant_id: str | None, local_only: bool, quota_jobs_per_minute: int | None,
           allow_private_callbacks: bool, frontier_mode: str | None, redis_url: str) -> None:
    """Create tenant NAME and print its id, API key and webhook secret as JSON."""
    with _registry(redis_url) as registry:
        issued = registry.create(name, tenant_id=tenant_id, local_only=local_only,
                                 quota_jobs_per_minute=quota_jobs_per_minute,
                                 allow_private_callbacks=allow_private_callbacks,
                                 frontier_mode=FrontierMode(frontier_mode) if frontier_mode else None)
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


def _limit_value(raw: str) -> Any:
    """`none` clears a setting (the API's default applies); numbers and words are parsed as JSON."""
    if raw.lower() in ("none", "null", "default"):
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


@command.command()
@click.argument("tenant_id")
@click.option("--local-only/--no-local-only", default=None, help="Keep every job on the self-hosted tier.")
@click.option("--quota", "quota_jobs_per_minute", type=click.IntRange(min=1), default=None,
              help="Jobs per minute this tenant may submit.")
@click.option("--budget-daily-usd", default=None, help="Frontier spend budget per UTC day in USD ('none': no limit).")
@click.option("--budget-monthly-usd", default=None,
              help="Frontier spend budget per UTC month in USD ('none': no limit).")
@click.option("--budget-policy", type=click.Choice(["small_only", "hold", "fail"]), default=None,
              help="What happens to work that would call the frontier once a budget is spent.")
@click.option("--fair-weight", type=click.IntRange(min=1, max=1000), default=None,
              help="This tenant's share of each tier queue against other tenants' waiting work (default 1).")
@click.option("--set", "settings", multiple=True, metavar="NAME=VALUE",
              help="Any other per-tenant limit (quotas, retention; see README), 'none' for the default.")
@redis_url_option
def update(tenant_id: str, local_only: bool | None, quota_jobs_per_minute: int | None, budget_daily_usd: str | None,
           budget_monthly_usd: str | None, budget_policy: str | None, fair_weight: int | None,
           settings: tuple[str, ...], redis_url: str) -> None:
    """Change TENANT_ID's settings and print the tenant."""
    limits: dict[str, Any] = {}
    if budget_daily_usd is not None:
        limits["budget_daily_usd"] = _limit_value(budget_daily_usd)
    if budget_monthly_usd is not None:
        limits["budget_monthly_usd"] = _limit_value(budget_monthly_usd)
    if budget_policy is not None:
        limits["budget_policy"] = budget_policy
    if fair_weight is not None:
        limits["fair_weight"] = fair_weight
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--set")
        limits[name.strip()] = _limit_value(value.strip())
    with _registry(redis_url) as registry:
        tenant = registry.update(tenant_id, local_only=local_only, quota_jobs_per_minute=quota_jobs_per_minute,
                                 limits=limits or None)
    _echo({key: value for key, value in tenant.public().items() if key != "webhook_secret"})


@command.command()
@click.argument("tenant_id")
@redis_url_option
def budget(tenant_id: str, redis_url: str) -> None:
    """Print TENANT_ID's frontier budget: policy, status, spend and limits per day and month."""
    with _registry(redis_url) as registry:
        registry.get(tenant_id)
        state = BudgetLedger(registry.redis).state(tenant_id, time.time())
    _echo({"id": tenant_id, "budget": state.public() if state is not None else None})

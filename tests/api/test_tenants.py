"""Tenants: `smallfirst tenant` commands, keys stored only hashed, rotation, API access with a new key."""

from __future__ import annotations

import json

import httpx
import redis
from click.testing import CliRunner

from smallfirst.cli.tenants import command as tenant_command
from smallfirst.common.tenants import TenantRegistry, hash_api_key
from tests.api_fixtures import ApiServerFactory


def run_cli(redis_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(tenant_command, list(args), env={"SMALLFIRST_REDIS_URL": redis_url})
    return result.exit_code, result.output


def everything_stored(client: redis.Redis) -> bytes:
    """Every key name and value in Redis, concatenated."""
    parts: list[bytes] = []
    for key in client.keys("*"):
        parts.append(key)
        kind = client.type(key)
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            parts.extend(client.hvals(key))
        elif kind == b"set":
            parts.extend(client.smembers(key))
    return b"\n".join(parts)


def test_create_prints_the_key_once_and_stores_only_its_hash(redis_url: str) -> None:
    # when
    code, output = run_cli(redis_url, "create", "Acme Corp", "--quota", "120", "--local-only")

    # then
    assert code == 0, output
    created = json.loads(output)
    assert created["name"] == "Acme Corp"
    assert created["api_key"].startswith("sf_live_")
    assert created["webhook_secret"].startswith("whsec_")
    assert created["quota_jobs_per_minute"] == 120
    assert created["local_only"] is True
    client = redis.Redis.from_url(redis_url)
    stored = everything_stored(client)
    assert created["webhook_secret"].encode() in stored
    assert created["api_key"].encode() not in stored
    found = TenantRegistry(client).lookup(created["api_key"])
    assert found is not None
    assert found.id == created["id"]
    assert client.exists(f"sf:apikey:{hash_api_key(created['api_key'])}")
    client.close()


def test_list_shows_tenants_without_key_material(redis_url: str) -> None:
    # given
    run_cli(redis_url, "create", "one", "--id", "one")
    run_cli(redis_url, "create", "two", "--id", "two")

    # when
    code, output = run_cli(redis_url, "list")

    # then
    assert code == 0
    listed = json.loads(output)
    assert [t["id"] for t in listed] == ["one", "two"]
    assert all("webhook_secret" not in t and "api_key_hashes" not in t for t in listed)
    assert [t["api_keys"] for t in listed] == [1, 1]


def test_duplicate_tenant_id_is_refused(redis_url: str) -> None:
    # given
    run_cli(redis_url, "create", "one", "--id", "one")

    # when
    code, output = run_cli(redis_url, "create", "again", "--id", "one")

    # then
    assert code != 0
    assert "already exists" in output


def test_rotated_key_works_and_the_old_one_is_refused(api_server_factory: ApiServerFactory, redis_url: str) -> None:
    # given: an API that does not cache tenants, and a tenant whose key is rotated
    server = api_server_factory(tenant_cache_ttl_s=0)
    _, output = run_cli(redis_url, "create", "acme")
    created = json.loads(output)
    code, output = run_cli(redis_url, "rotate-key", created["id"])
    assert code == 0, output
    new_key = json.loads(output)["api_key"]

    # when
    with_old = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {created['api_key']}"})
    with_new = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {new_key}"})

    # then
    assert with_old.status_code == 401
    assert with_new.status_code == 200


def test_added_key_leaves_the_old_one_valid(redis_url: str) -> None:
    # given
    client = redis.Redis.from_url(redis_url)
    registry = TenantRegistry(client)
    issued = registry.create("acme")

    # when
    second = registry.add_key(issued.tenant.id)

    # then
    assert registry.lookup(issued.api_key) is not None
    assert registry.lookup(second) is not None
    registry.revoke_key(issued.tenant.id, issued.api_key)
    assert registry.lookup(issued.api_key) is None
    assert registry.lookup(second) is not None
    client.close()


def test_update_sets_budgets_quotas_and_retention_and_budget_shows_the_spend(redis_url: str) -> None:
    # given a tenant
    code, output = run_cli(redis_url, "create", "acme", "--id", "acme")
    assert code == 0, output

    # when an operator sets its budget, a quota and its retention, then clears the quota
    code, updated = run_cli(redis_url, "update", "acme", "--budget-daily-usd", "2.5", "--budget-policy", "hold",
                            "--set", "quota_max_jobs_in_flight=100", "--set", "retention_s=86400")
    cleared_code, cleared = run_cli(redis_url, "update", "acme", "--set", "quota_max_jobs_in_flight=none")
    refused_code, refused = run_cli(redis_url, "update", "acme", "--set", "quota_nonsense=1")
    invalid_code, invalid = run_cli(redis_url, "update", "acme", "--set", "retention_s=-5")
    budget_code, budget = run_cli(redis_url, "budget", "acme")

    # then the tenant carries them, unknown or invalid settings are refused, and its budget is shown
    assert code == 0, updated
    tenant = json.loads(updated)
    assert (tenant["budget_daily_usd"], tenant["budget_policy"]) == (2.5, "hold")
    assert (tenant["quota_max_jobs_in_flight"], tenant["retention_s"]) == (100, 86400)
    assert cleared_code == 0, cleared
    assert json.loads(cleared)["quota_max_jobs_in_flight"] is None
    assert refused_code != 0
    assert "quota_nonsense" in refused
    assert invalid_code != 0
    assert "retention_s" in invalid
    assert budget_code == 0, budget
    shown = json.loads(budget)["budget"]
    assert (shown["policy"], shown["status"], shown["day"]["limit_usd"], shown["day"]["spent_usd"]) == (
        "hold", "ok", 2.5, 0.0)

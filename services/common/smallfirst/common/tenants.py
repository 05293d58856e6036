"""Tenants and their API keys.

A tenant is stored as JSON in the hash `TENANTS_KEY`. An API key is shown once, when it is issued,
and stored only as its SHA-256 under `api_key_key(sha256)`, which maps it to the tenant id: a copy
of the database does not give anyone a usable key. The webhook secret is kept as is, because the
delivery task needs it to sign callbacks.

`TenantRegistry` (blocking client) serves the CLI, the dev stack and the workers;
`AsyncTenantRegistry` serves the API, which only looks tenants up.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, Field, ValidationError

from smallfirst.common import constants as k
from smallfirst.common.budgets import BudgetPolicy
from smallfirst.common.errors import Conflict, NotFound, RequestError
from smallfirst.common.jobs import FrontierMode
from smallfirst.common.webhooks import generate_secret

API_KEY_PREFIX = "sf_live_"
TENANT_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_\-]{0,63}$")

# One round trip: the key's hash to the tenant id, then the tenant's record.
_LOOKUP_SCRIPT = """
local tenant_id = redis.call('GET', KEYS[1])
if not tenant_id then return false end
return redis.call('HGET', KEYS[2], tenant_id)
"""


class TenantError(RequestError, ValueError):
    """A tenant operation was refused; the message says why."""


class TenantExists(TenantError, Conflict):
    pass


class TenantNotFound(TenantError, NotFound, LookupError):
    pass


class Tenant(BaseModel):
    id: str
    name: str
    # SHA-256 (hex) of each API key that is valid for this tenant; several during a key rotation.
    api_key_hashes: list[str] = Field(default_factory=list)
    # Standard Webhooks secret (`whsec_<base64>`) with which callbacks to this tenant are signed.
    webhook_secret: str
    # Every job of this tenant stays on the self-hosted tier.
    local_only: bool = False
    # False: no job of this tenant becomes a training example (its answers are still served).
    learning: bool = True
    # False: this tenant's feedback is counted but never trains a head shared by other tenants.
    feedback_trusted: bool = True
    # None: the API's default quota applies.
    quota_jobs_per_minute: int | None = Field(default=None, gt=0)
    # Lets this tenant's callbacks reach private addresses (a tenant inside the operator's network).
    allow_private_callbacks: bool = False
    # How this tenant's frontier attempts are sent when the job does not say; None: the task's mode.
    frontier_mode: FrontierMode | None = None
    # Frontier spend budgets in USD per UTC day and month (None: no limit), and what happens to work
    # that would call the frontier once one is spent (budgets.py).
    budget_daily_usd: float | None = Field(default=None, ge=0)
    budget_monthly_usd: float | None = Field(default=None, ge=0)
    budget_policy: BudgetPolicy = BudgetPolicy.SMALL_ONLY
    # Quotas (quotas.py) and retention; None: the API's default for every tenant applies.
    quota_max_jobs_in_flight: int | None = Field(default=None, gt=0)
    quota_max_bytes_stored: int | None = Field(default=None, gt=0)
    quota_submissions_per_s: float | None = Field(default=None, gt=0)
    quota_submissions_burst: int | None = Field(default=None, gt=0)
    quota_max_input_bytes: int | None = Field(default=None, gt=0)
    # How long this tenant's job records, results and listing entries are kept after their last change.
    retention_s: int | None = Field(default=None, gt=0)
    # How long a replayable idempotency record is kept.
    idempotency_ttl_s: int | None = Field(default=None, gt=0)
    # Fair scheduling (fair.py): this tenant's share of each tier and priority against the other
    # tenants with work waiting there, as jobs per round robin turn.
    fair_weight: int = Field(default=1, ge=1, le=1000)
    created_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """What an operator may see: everything but the key hashes."""
        return self.model_dump(mode="json", exclude={"api_key_hashes"})


# The settings `TenantRegistry.update(limits=...)` and `smallfirst tenant update` may change by name.
LIMIT_FIELDS: tuple[str, ...] = (
    "quota_jobs_per_minute", "budget_daily_usd", "budget_monthly_usd", "budget_policy", "quota_max_jobs_in_flight",
    "quota_max_bytes_stored", "quota_submissions_per_s", "quota_submissions_burst", "quota_max_input_bytes",
    "retention_s", "idempotency_ttl_s", "fair_weight")
# Settings that are never empty: `none` puts them back to this default.
LIMIT_DEFAULTS: dict[str, Any] = {"fair_weight": 1}


@dataclass(frozen=True)
class IssuedTenant:
    """A tenant just created, with the only copy of its plaintext API key."""

    tenant: Tenant
    api_key: str


def _with_limits(tenant: Tenant, limits: dict[str, Any]) -> Tenant:
    """`tenant` with the settings in `limits` (names from LIMIT_FIELDS), validated."""
    unknown = sorted(set(limits) - set(LIMIT_FIELDS))
    if unknown:
        raise TenantError(f"unknown tenant setting(s) {unknown}; known: {sorted(LIMIT_FIELDS)}")
    limits = {name: LIMIT_DEFAULTS[name] if value is None and name in LIMIT_DEFAULTS else value
              for name, value in limits.items()}
    try:
        return Tenant.model_validate({**tenant.model_dump(), **limits})
    except ValidationError as exc:
        raise TenantError(f"invalid tenant setting: {exc}") from exc


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_tenant_id() -> str:
    return f"ten_{secrets.token_hex(6)}"


def _decode(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _parse(raw: bytes | str) -> Tenant:
    try:
        return Tenant.model_validate_json(raw)
    except ValidationError as exc:
        raise TenantError(f"stored tenant record does not parse: {exc}") from exc


class TenantRegistry:
    """Create tenants, issue and revoke their keys, look them up (blocking Redis client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def create(self, name: str, *, tenant_id: str | None = None, local_only: bool = False,
               quota_jobs_per_minute: int | None = None, allow_private_callbacks: bool = False,
               frontier_mode: FrontierMode | None = None, limits: dict[str, Any] | None = None) -> IssuedTenant:
        """Create a tenant and its first API key; the plaintext key is returned here and never again."""
        if not name.strip():
            raise TenantError("a tenant needs a non-empty name")
        tenant_id = tenant_id or new_tenant_id()
        if not TENANT_ID_PATTERN.match(tenant_id):
            raise TenantError(f"tenant id {tenant_id!r} must match {TENANT_ID_PATTERN.pattern}")
        if quota_jobs_per_minute is not None and quota_jobs_per_minute <= 0:
            raise TenantError("quota_jobs_per_minute must be positive")
        api_key = new_api_key()
        tenant = Tenant(id=tenant_id, name=name, api_key_hashes=[hash_api_key(api_key)],
                        webhook_secret=generate_secret(), local_only=local_only,
                        quota_jobs_per_minute=quota_jobs_per_minute,
                        allow_private_callbacks=allow_private_callbacks, frontier_mode=frontier_mode,
                        created_at=time.time())
        if limits:
            tenant = _with_limits(tenant, limits)
        if not self.redis.hsetnx(k.TENANTS_KEY, tenant.id, tenant.model_dump_json()):
            raise TenantExists(f"tenant {tenant_id!r} already exists")
        self.redis.set(k.api_key_key(tenant.api_key_hashes[0]), tenant.id)
        return IssuedTenant(tenant=tenant, api_key=api_key)

    def get(self, tenant_id: str) -> Tenant:
        raw = self.redis.hget(k.TENANTS_KEY, tenant_id)
        if raw is None:
            raise TenantNotFound(f"no tenant {tenant_id!r}")
        return _parse(raw)

    def all(self) -> list[Tenant]:
        raws: dict[Any, Any] = self.redis.hgetall(k.TENANTS_KEY)
        return sorted((_parse(raw) for raw in raws.values()), key=lambda t: t.created_at)

    def lookup(self, api_key: str) -> Tenant | None:
        tenant_id = self.redis.get(k.api_key_key(hash_api_key(api_key)))
        if tenant_id is None:
            return None
        try:
            tenant = self.get(_decode(tenant_id))
        except TenantNotFound:
            return None
        # Revoking updates the record before it deletes the key's mapping: the record decides.
        return tenant if hash_api_key(api_key) in tenant.api_key_hashes else None

    def add_key(self, tenant_id: str) -> str:
        """Issue one more key (the old ones stay valid): the first half of a rotation."""
        api_key = new_api_key()
        digest = hash_api_key(api_key)
        self._update(tenant_id, lambda t: t.api_key_hashes.append(digest))
        self.redis.set(k.api_key_key(digest), tenant_id)
        return api_key

    def revoke_key(self, tenant_id: str, api_key: str) -> None:
        digest = hash_api_key(api_key)
        self._revoke_hashes(tenant_id, [digest])

    def rotate_key(self, tenant_id: str) -> str:
        """Issue a new key and revoke every other key of the tenant at once."""
        old = list(self.get(tenant_id).api_key_hashes)
        api_key = self.add_key(tenant_id)
        self._revoke_hashes(tenant_id, old)
        return api_key

    def update(self, tenant_id: str, *, local_only: bool | None = None, learning: bool | None = None,
               quota_jobs_per_minute: int | None = None, allow_private_callbacks: bool | None = None,
               frontier_mode: FrontierMode | None = None, limits: dict[str, Any] | None = None) -> Tenant:
        """Change a tenant's settings; `limits` sets budget, quota and retention fields by name (a
        value of None clears one: the API's default applies again)."""
        checked = _with_limits(self.get(tenant_id), limits) if limits else None

        def change(tenant: Tenant) -> None:
            if checked is not None:
                for name in limits or {}:
                    setattr(tenant, name, getattr(checked, name))
            if frontier_mode is not None:
                tenant.frontier_mode = frontier_mode
            if local_only is not None:
                tenant.local_only = local_only
            if learning is not None:
                tenant.learning = learning
            if quota_jobs_per_minute is not None:
                tenant.quota_jobs_per_minute = quota_jobs_per_minute
            if allow_private_callbacks is not None:
                tenant.allow_private_callbacks = allow_private_callbacks

        return self._update(tenant_id, change)

    def _revoke_hashes(self, tenant_id: str, digests: list[str]) -> None:
        revoked = set(digests)
        self._update(tenant_id, lambda t: setattr(t, "api_key_hashes", [h for h in t.api_key_hashes
                                                                         if h not in revoked]))
        for digest in revoked:
            self.redis.delete(k.api_key_key(digest))

    def _update(self, tenant_id: str, change: Any) -> Tenant:
        # Compare-and-set on the tenants hash, so two operators rotating keys do not lose a write.
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(k.TENANTS_KEY)
                    raw: Any = pipe.hget(k.TENANTS_KEY, tenant_id)
                    if raw is None:
                        raise TenantNotFound(f"no tenant {tenant_id!r}")
                    tenant = _parse(raw)
                    change(tenant)
                    pipe.multi()
                    pipe.hset(k.TENANTS_KEY, tenant_id, tenant.model_dump_json())
                    pipe.execute()
                    return tenant
                except redis.WatchError:
                    continue


class AsyncTenantRegistry:
    """Tenant look-ups for the API (asyncio Redis client), one round trip per look-up."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._lookup = client.register_script(_LOOKUP_SCRIPT)

    async def lookup(self, api_key: str) -> Tenant | None:
        raw = await self._lookup(keys=[k.api_key_key(hash_api_key(api_key)), k.TENANTS_KEY])
        if raw is None:
            return None
        tenant = _parse(raw)
        # Revoking updates the record before it deletes the key's mapping: the record decides.
        return tenant if hash_api_key(api_key) in tenant.api_key_hashes else None

    async def get(self, tenant_id: str) -> Tenant:
        raw = await self.redis.hget(k.TENANTS_KEY, tenant_id)
        if raw is None:
            raise TenantNotFound(f"no tenant {tenant_id!r}")
        return _parse(raw)

"""Bearer API keys to tenants, with a short in-process cache so a submission costs no extra round trip."""

from __future__ import annotations

import hashlib
import time

from smallfirst.api.errors import ApiError
from smallfirst.common.tenants import AsyncTenantRegistry, Tenant

REALM = "smallfirst"
_MAX_CACHED_KEYS = 10_000


def unauthorized(message: str, *, invalid_token: bool) -> ApiError:
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid_token else "")
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": challenge})


class Authenticator:
    def __init__(self, registry: AsyncTenantRegistry, cache_ttl_s: float) -> None:
        self.registry = registry
        self.cache_ttl_s = cache_ttl_s
        # sha256(key) -> (tenant, expiry on the monotonic clock); never the plaintext key.
        self._cache: dict[str, tuple[Tenant, float]] = {}

    async def authenticate(self, authorization: str | None) -> Tenant:
        if not authorization:
            raise unauthorized("missing Authorization header; send 'Authorization: Bearer <API key>'",
                               invalid_token=False)
        scheme, _, api_key = authorization.partition(" ")
        api_key = api_key.strip()
        if scheme.lower() != "bearer" or not api_key:
            raise unauthorized("the Authorization header must be 'Bearer <API key>'", invalid_token=False)
        digest = hashlib.sha256(api_key.encode("utf-8")).hexdigest()
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        tenant = await self.registry.lookup(api_key)
        if tenant is None:
            self._cache.pop(digest, None)
            raise unauthorized("unknown or revoked API key", invalid_token=True)
        if self.cache_ttl_s > 0:
            if len(self._cache) >= _MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (tenant, now + self.cache_ttl_s)
        return tenant

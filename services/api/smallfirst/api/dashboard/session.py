"""The dashboard's sessions: who is looking (a tenant or the operator), in a signed cookie.

A session cookie holds the role, the tenant id, a fingerprint of the key that logged in, an expiry
and a random nonce, signed with HMAC-SHA256. Nothing secret is in it: the key itself never leaves
the login request. Every page checks the fingerprint against the tenant's current keys (or the
operator key), so revoking a key ends the sessions it opened at the next page.

The CSRF token of a session is derived from its nonce (HMAC under the same secret): a form POST
must carry it. The login form, before any session exists, uses a double-submit token: a random
value in its own cookie and in the form.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from enum import StrEnum

SESSION_COOKIE = "sf_ui_session"
LOGIN_CSRF_COOKIE = "sf_ui_login"
CSRF_FIELD = "csrf_token"
_FINGERPRINT_HEX = 32


class Role(StrEnum):
    TENANT = "tenant"
    OPERATOR = "operator"


def key_fingerprint(api_key: str) -> str:
    """A short digest of a key, enough to tell whether it is still valid (never the key)."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()[:_FINGERPRINT_HEX]


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    role: Role
    tenant_id: str | None  # None for the operator
    key_fingerprint: str
    expires_at: float
    nonce: str

    @property
    def is_operator(self) -> bool:
        return self.role is Role.OPERATOR


class SessionSigner:
    def __init__(self, secret: bytes, ttl_s: int) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def _mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._secret, purpose.encode() + b"\x00" + data, hashlib.sha256).digest()

    def issue(self, role: Role, tenant_id: str | None, api_key: str, now: float | None = None) -> tuple[Session, str]:
        """A new session and its cookie value."""
        session = Session(role=role, tenant_id=tenant_id, key_fingerprint=key_fingerprint(api_key),
                          expires_at=(time.time() if now is None else now) + self.ttl_s,
                          nonce=secrets.token_urlsafe(16))
        payload = json.dumps({"r": session.role.value, "t": session.tenant_id, "f": session.key_fingerprint,
                              "x": session.expires_at, "n": session.nonce}, separators=(",", ":")).encode()
        return session, f"{_b64(payload)}.{_b64(self._mac('session', payload))}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie carries, or None when it is missing, forged, malformed or expired."""
        if not cookie or "." not in cookie:
            return None
        body, _, signature = cookie.partition(".")
        try:
            payload = _unb64(body)
            if not hmac.compare_digest(_unb64(signature), self._mac("session", payload)):
                return None
            data = json.loads(payload)
            session = Session(role=Role(data["r"]), tenant_id=data["t"], key_fingerprint=str(data["f"]),
                              expires_at=float(data["x"]), nonce=str(data["n"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None
        if session.expires_at <= (time.time() if now is None else now):
            return None
        if session.role is Role.TENANT and not session.tenant_id:
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        return _b64(self._mac("csrf", session.nonce.encode()))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))


def new_login_token() -> str:
    return secrets.token_urlsafe(24)


def login_token_ok(cookie: str | None, field: str | None) -> bool:
    return bool(cookie) and bool(field) and hmac.compare_digest(str(cookie), str(field))

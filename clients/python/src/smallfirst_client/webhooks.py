"""Checking a smallfirst callback: Standard Webhooks signatures.

A delivery carries `webhook-id`, `webhook-timestamp` (Unix s) and `webhook-signature`: one or more
space-separated `v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`, keyed by the base64 part
of the tenant's `whsec_...` secret. Verify the raw body, before parsing it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 5 * 60


class WebhookVerificationError(ValueError):
    """The signature or the timestamp does not check out; the message says which."""


def _key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise WebhookVerificationError("the webhook secret is not base64 after its whsec_ prefix") from exc


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify(secret: str, headers: Mapping[str, str], body: bytes | str, *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> dict[str, Any]:
    """The callback's JSON (the job resource) if its signature and timestamp check out, else
    WebhookVerificationError. Header names are compared case-insensitively."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id, timestamp, signatures = (lowered["webhook-id"], lowered["webhook-timestamp"],
                                         lowered["webhook-signature"])
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from exc
    try:
        ts = int(timestamp)
    except ValueError as exc:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp!r} is not an integer") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError(f"webhook-timestamp {ts} is {current - ts:+.0f} s from now, outside the "
                                       f"{tolerance_s:.0f} s tolerance")
    expected = signature(secret, msg_id, ts, raw)
    for candidate in signatures.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value, expected):
            payload: dict[str, Any] = json.loads(raw)
            return payload
    raise WebhookVerificationError("no v1 signature in webhook-signature matches the body")

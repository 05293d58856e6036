"""Webhook signing (Standard Webhooks) and the callback URL policy.

A callback carries three headers: `webhook-id` (the message id, the same on every retry so that a
receiver can drop duplicates), `webhook-timestamp` (Unix seconds) and `webhook-signature`: one or
more space-separated `v1,<base64 HMAC-SHA256>` over `{id}.{timestamp}.{body}`. The key is the
base64 part of the tenant's `whsec_...` secret. Receivers reject timestamps too far from now, so a
captured callback cannot be replayed later.

Callback URLs that resolve to loopback, private, link-local or other non-public addresses are
refused unless the operator allows them (also when hidden in an IPv6 form that embeds an IPv4
address: IPv4-mapped and -compatible, NAT64, 6to4, Teredo): otherwise a tenant could make the workers call into the
operator's own network (SSRF). The API checks at submit time, the delivery task again at send time
(a DNS answer may have changed in between), and should connect to the addresses the check returns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from smallfirst.common import constants as k
from smallfirst.common.errors import InvalidRequest, SmallfirstError

SECRET_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"
DEFAULT_TOLERANCE_S = 5 * 60
ALLOWED_SCHEMES = ("http", "https")

Resolver = Callable[[str, int], Sequence[str]]


class WebhookVerificationError(SmallfirstError, ValueError):
    """A webhook's signature or timestamp does not check out; the message says which."""


class CallbackUrlRefused(InvalidRequest, ValueError):
    """A callback URL the policy does not allow; the message says why."""

    code = "callback_url_not_allowed"


def generate_secret(num_bytes: int = 24) -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(num_bytes)).decode("ascii")


def _secret_key(secret: str) -> bytes:
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        return base64.b64decode(encoded, validate=True)
    except binascii.Error as exc:
        raise WebhookVerificationError("the webhook secret is not base64 after its whsec_ prefix") from exc


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else body


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` value of one message: `v1,<base64 HMAC-SHA256>`."""
    signed = f"{msg_id}.{timestamp}.".encode() + _as_bytes(body)
    digest = hmac.new(_secret_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(secrets_: str | Sequence[str], msg_id: str, body: bytes | str,
                      timestamp: int | None = None) -> dict[str, str]:
    """The three headers of a delivery. Several secrets (during a rotation) give several signatures."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    keys = [secrets_] if isinstance(secrets_, str) else list(secrets_)
    return {
        k.HEADER_WEBHOOK_ID: msg_id,
        k.HEADER_WEBHOOK_TIMESTAMP: str(timestamp),
        k.HEADER_WEBHOOK_SIGNATURE: " ".join(sign(secret, msg_id, timestamp, body) for secret in keys),
    }


def verify(secret: str, msg_id: str, timestamp: str | int, body: bytes | str, signature_header: str, *,
           tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> None:
    """Raise WebhookVerificationError unless one `v1` signature in the header matches and the
    timestamp lies within `tolerance_s` of now (either way: clocks drift)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError) as exc:
        raise WebhookVerificationError(f"webhook-timestamp {timestamp!r} is not an integer") from exc
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise WebhookVerificationError(
            f"webhook-timestamp {ts} is {current - ts:+.0f} s from now, outside the {tolerance_s:.0f} s tolerance")
    expected = sign(secret, msg_id, ts, body).partition(",")[2]
    for candidate in signature_header.split():
        version, _, value = candidate.partition(",")
        if version == SIGNATURE_VERSION and hmac.compare_digest(value, expected):
            return
    raise WebhookVerificationError("no v1 signature in webhook-signature matches the body")


def verify_headers(secret: str, headers: Mapping[str, str], body: bytes | str, *,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> None:
    """`verify` with the values taken from a delivery's headers (names compared case-insensitively)."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        msg_id = lowered[k.HEADER_WEBHOOK_ID]
        timestamp = lowered[k.HEADER_WEBHOOK_TIMESTAMP]
        signature = lowered[k.HEADER_WEBHOOK_SIGNATURE]
    except KeyError as exc:
        raise WebhookVerificationError(f"missing header {exc.args[0]}") from exc
    verify(secret, msg_id, timestamp, body, signature, tolerance_s=tolerance_s, now=now)


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


# IPv6 prefixes whose low 32 bits are an IPv4 address that a translator connects to: NAT64's
# well-known prefix (RFC 6052) and its local-use prefix (RFC 8215). `ipaddress` calls both global.
_NAT64_PREFIXES = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and may end up reaching: IPv4-mapped
    (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d, deprecated), NAT64 (64:ff9b::/96 and
    64:ff9b:1::/48), 6to4 (2002::/16) and Teredo (2001::/32: its server and its client)."""
    found: list[ipaddress.IPv4Address] = []
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if ip in _IPV4_COMPATIBLE:
        found.append(low32)
    if any(ip in prefix for prefix in _NAT64_PREFIXES):
        found.append(low32)
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def _is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = embedded_ipv4(ip)
        if ip.ipv4_mapped is not None:
            # Only the IPv4 address counts: ::ffff:0:0/96 itself is never "global".
            candidates = list(embedded)
        else:
            candidates.extend(embedded)
    # is_global is false for loopback, private, link-local (cloud metadata), shared (CGNAT),
    # unspecified and reserved ranges; multicast is never a web server. Every address a
    # connection may reach must pass, the embedded IPv4 ones included.
    return all(c.is_global and not c.is_multicast for c in candidates)


def check_callback_url(url: str, allow_private: bool, *, resolver: Resolver | None = None) -> list[str]:
    """Raise CallbackUrlRefused unless `url` may receive callbacks.

    Returns the addresses the host resolved to (empty when private targets are allowed and nothing
    was resolved), so a sender can connect to exactly the addresses that were checked. Blocking
    (DNS): call it from a thread in async code.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackUrlRefused(f"callback_url is not a valid URL: {exc}") from exc
    if parts.scheme not in ALLOWED_SCHEMES:
        raise CallbackUrlRefused(f"callback_url must use http or https, not {parts.scheme or '(none)'!r}")
    host = parts.hostname
    if not host:
        raise CallbackUrlRefused("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise CallbackUrlRefused("callback_url must not carry credentials")
    if allow_private:
        return []
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = list((resolver or _system_resolver)(host, port))
        except (OSError, UnicodeError) as exc:
            raise CallbackUrlRefused(f"callback_url host {host!r} does not resolve: {exc}") from exc
    if not addresses:
        raise CallbackUrlRefused(f"callback_url host {host!r} does not resolve")
    blocked = [address for address in addresses if not _is_public(address)]
    if blocked:
        raise CallbackUrlRefused(
            f"callback_url host {host!r} resolves to non-public address(es) {', '.join(blocked)}; "
            "the operator has not allowed private callback targets")
    return addresses

"""The Redis connection of every Celery app here: the broker transport (kombu's Redis transport with
one fix) and the TLS options a `rediss://` URL asks for.

The fix. When the consumer loses its broker connection, Celery collects the connection, which
detaches the transport from it (`transport.client = None`), and then stops its consumer steps;
closing a channel that still holds delivered, unacknowledged messages restores them through a new
connection pool, whose parameters kombu reads from `transport.client`: `AttributeError: 'NoneType'
object has no attribute 'hostname'`. Celery takes that for an unrecoverable error and stops the
worker (the same family as celery/kombu#582). `Channel` keeps the connection parameters it was
created with and uses them once the transport has been detached, so restoring works (or fails with a
connection error, which Celery handles) and the consumer reconnects.

TLS. kombu turns a `rediss://` broker URL without explicit options into `ssl_cert_reqs=CERT_NONE`
(no certificate check at all). Here a `rediss://` URL verifies the server by default, against the
system's CAs or the `ssl_ca_certs` file named in the URL's query, the same query parameters redis-py
reads (`ssl_cert_reqs`, `ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`), so one URL means the same
thing to the API's redis-py clients and to Celery.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kombu.transport import redis as kombu_redis

# Celery's broker_transport setting: this module's Transport instead of kombu's own.
TRANSPORT_PATH = "smallfirst.common.broker:Transport"

SSL_QUERY_KEYS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED,
              "cert_none": ssl.CERT_NONE, "cert_optional": ssl.CERT_OPTIONAL, "cert_required": ssl.CERT_REQUIRED}


class BrokerUrlError(ValueError):
    """A Redis URL whose TLS options cannot be understood."""


class Channel(kombu_redis.Channel):
    def __init__(self, connection: Any, *args: Any, **kwargs: Any) -> None:
        # Before the base class runs: it may already open a pool.
        self._conninfo = connection.client
        super().__init__(connection, *args, **kwargs)

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is not None and transport.client is None and self._conninfo is not None:
            # Detached by a collect after a lost connection: read the parameters it was created with.
            transport.client = self._conninfo
            try:
                params: dict[str, Any] = super()._connparams(asynchronous=asynchronous)
            finally:
                transport.client = None
            return params
        params = super()._connparams(asynchronous=asynchronous)
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


def is_tls_url(url: str) -> bool:
    return urlsplit(url).scheme == "rediss"


def split_broker_url(url: str) -> tuple[str, dict[str, Any] | None]:
    """The URL for kombu (its query string holds only TLS options, which kombu cannot take there)
    and the `broker_use_ssl` options: None for `redis://`, verification on unless the URL turns it off."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    ssl_items = {key: value for key, value in query if key in SSL_QUERY_KEYS}
    rest = [(key, value) for key, value in query if key not in SSL_QUERY_KEYS]
    plain = urlunsplit(parts._replace(query=urlencode(rest)))
    if parts.scheme != "rediss":
        if ssl_items:
            raise BrokerUrlError(f"TLS options {sorted(ssl_items)} given on a redis:// URL; use rediss://")
        return plain, None
    reqs_text = ssl_items.pop("ssl_cert_reqs", "required").lower()
    if reqs_text not in _CERT_REQS:
        raise BrokerUrlError(f"ssl_cert_reqs={reqs_text!r}: use required, optional or none")
    options: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[reqs_text]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if ssl_items.get(key):
            options[key] = ssl_items[key]
    if "ssl_check_hostname" in ssl_items:
        options["ssl_check_hostname"] = ssl_items["ssl_check_hostname"].lower() in {"1", "true", "yes"}
    return plain, options

"""Redis with a password and TLS only (`rediss://`): the API, the tenant registry and a Celery worker
pool all run through it, and each verifies the server's certificate. Real redis-server (built with
TLS), API, frontier pool and frontier simulator, each a process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import kombu.exceptions
import pytest
import redis

from smallfirst.cli.job_stream import FRONTIER_JOB
from smallfirst.cli.stack import RedisTls, Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from smallfirst.common.tenants import TenantRegistry
from tests.support.redis_server import RedisServer
from tests.support.tls import make_certificates

pytestmark = pytest.mark.e2e

PASSWORD = "s3cret-for-tests"


@pytest.fixture(scope="module")
def secured_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """redis-server with `requirepass` and TLS on its only port (plain TCP off)."""
    workdir = tmp_path_factory.mktemp("secured-redis")
    certs = make_certificates(workdir / "certs")
    server = RedisServer(workdir, password=PASSWORD,
                         tls=RedisTls(cert_file=certs.cert_file, key_file=certs.key_file, ca_file=certs.ca_file))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured_stack(secured_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory,
                  catalog_path: Path) -> Iterator[Stack]:
    stack = Stack(StackConfig(workdir=tmp_path_factory.mktemp("secured-stack"), catalog_path=catalog_path,
                              redis_url=secured_redis.url, frontier_concurrency=2))
    try:
        stack.start_frontier_sim()
        stack.start_api()
        stack.start_worker(k.POOL_FRONTIER)
        yield stack
    finally:
        stack.stop_all()


def without_query(url: str) -> str:
    return urlunsplit(urlsplit(url)._replace(query=""))


def test_job_runs_end_to_end_over_redis_with_password_and_tls(secured_stack: Stack, secured_redis: RedisServer) -> None:
    # given: a tenant, registered through the same rediss:// URL
    tenant = TenantRegistry(redis.Redis.from_url(secured_redis.url)).create("tls-tenant")
    with httpx.Client(base_url=secured_stack.api_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                      timeout=60) as client:
        # when: a frontier job is submitted
        created = client.post("/v1/jobs", json=FRONTIER_JOB)
        assert created.status_code == 202, created.text
        job = client.get(f"/v1/jobs/{created.json()['id']}", params={"wait": 30}).json()
        # then: the API stored it, the worker took it from the TLS broker and answered it
        assert job["status"] == "succeeded", job
        assert client.get("/readyz").status_code == 200


def test_redis_refuses_clients_without_the_password_or_without_tls(secured_redis: RedisServer) -> None:
    no_password = secured_redis.url.replace(f":{PASSWORD}@", "")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(no_password, socket_timeout=2).ping()
    plain = secured_redis.url.replace("rediss://", "redis://").split("?", 1)[0]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plain, socket_timeout=2, socket_connect_timeout=2).ping()


def test_clients_refuse_a_server_certificate_from_an_unknown_authority(secured_redis: RedisServer,
                                                                        catalog_path: Path) -> None:
    # given: the URL without the test CA, so only the system's authorities are trusted
    url = without_query(secured_redis.url)
    # then: redis-py and the Celery broker connection both refuse the server
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate"):
        redis.Redis.from_url(url, socket_timeout=2).ping()
    app = make_celery(CoreSettings.model_validate({"redis_url": url, "catalog_path": catalog_path}))
    with pytest.raises((redis.ConnectionError, kombu.exceptions.OperationalError)), \
            app.connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, timeout=5)

"""Fixtures for observability tests: a real OTLP receiver the services under test export to, and
the project's Celery app publishing to the test Redis.

Use as a pytest plugin (`pytest_plugins = ["tests.observability_fixtures"]` in the root conftest)
or import the fixtures into a conftest. Start the processes under test with
`otlp_receiver.env()` (or `.env("grpc")`) in their environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery

from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.queues import make_celery
from smallfirst.common.settings import CoreSettings
from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP and OTLP/gRPC trace receiver on free ports, empty at the start of each test."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    """The project's Celery app (priority queues on Redis), publishing to the test Redis."""
    app = make_celery(CoreSettings(redis_url=redis_url, catalog_path=default_catalog_path()))
    yield app
    app.close()

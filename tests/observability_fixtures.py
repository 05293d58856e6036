"""Fixtures for observability tests: a real OTLP receiver the services under test export to.

Use as a pytest plugin (`pytest_plugins = ["tests.observability_fixtures"]` in the root conftest)
or import the fixtures into a conftest. Start the processes under test with
`otlp_receiver.env()` (or `.env("grpc")`) in their environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.otlp_receiver import OtlpReceiver


@pytest.fixture
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP and OTLP/gRPC trace receiver on free ports, empty at the start of each test."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()

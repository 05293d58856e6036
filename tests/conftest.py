"""Fixtures shared by every test: a real Redis, a log folder, the example catalog."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from smallfirst.common.catalog import Catalog, default_catalog_path, load_catalog
from tests.support.redis_server import RedisServer

pytest_plugins = [
    "tests.api_fixtures",
    "tests.frontier_fixtures",
    "tests.inference_fixtures",
    "tests.observability_fixtures",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A real Redis, emptied before each test that asks for it."""
    if not redis_server.alive():
        redis_server.restart()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def catalog_path() -> Path:
    return default_catalog_path()


@pytest.fixture(scope="session")
def catalog(catalog_path: Path) -> Catalog:
    return load_catalog(catalog_path)

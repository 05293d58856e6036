"""A stack for fault injection: its own redis-server (killed and restarted by the tests), the frontier
simulator answering after a delay (so that jobs are in flight when a fault strikes), the API, and
the frontier and webhooks pools under the stack's supervisor. No inference server: the jobs are
frontier-routed, so these tests need no vLLM. Leases and sweeps are short so that recovery from a
lost message or a dead worker happens within a test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from smallfirst.cli.stack import Stack, StackConfig
from smallfirst.common import constants as k
from smallfirst.common.catalog import default_catalog_path
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.support.procs import require_binary

FAULT_ENV = {
    "SMALLFIRST_SWEEP_STALE_AFTER_S": "10",
    "SMALLFIRST_WORKER_EXIT_GRACE_S": "5",
    "SMALLFIRST_LOG_JSON": "false",
}


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require_binary("redis-server")
    config = StackConfig(workdir=tmp_path_factory.mktemp("fault-stack"), catalog_path=default_catalog_path(),
                         frontier_sim_args=["--latency-ms", "300"], frontier_concurrency=8, webhook_concurrency=4,
                         job_lease_s=10, sweep_interval_s=1.0, extra_env=FAULT_ENV)
    stack = Stack(config)
    try:
        stack.start_redis()
        stack.start_frontier_sim()
        stack.start_api()
        stack.start_worker(k.POOL_FRONTIER)
        stack.start_worker(k.POOL_WEBHOOKS)
        stack.start_supervisor(interval_s=0.5)
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def fault_tenant(fault_stack: Stack) -> IssuedTenant:
    return TenantRegistry(redis.Redis.from_url(fault_stack.redis_url)).create("faults")

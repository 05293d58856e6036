"""The native thread pools (OpenBLAS, MKL, OpenMP) of a small-worker process, limited at its bootstrap.

The pool runs many job threads per process. numpy's BLAS starts its own pool of threads for every
matrix product, so N job threads each scoring a label index start N x cores BLAS threads that fight
over the same cores: a 1,660 x 384 matrix-vector product took 168 ms under 32 job threads on two
cores, against 45 us with one BLAS thread. The job threads already give the process its
parallelism; each product runs on the thread that asked for it.

The limit is set with threadpoolctl on the libraries already loaded (numpy is imported first, which
loads its BLAS), for the whole process: the pools are process-wide, whatever thread sets them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


def limit_native_threads(limit: int) -> list[dict[str, Any]]:
    """Cap every native thread pool of this process at `limit` threads; returns threadpoolctl's view
    of the pools after the change."""
    import numpy  # noqa: F401  (loads the BLAS library that threadpoolctl then finds)
    from threadpoolctl import threadpool_info, threadpool_limits

    # Not used as a context manager: the limit stays for the life of the process.
    threadpool_limits(limits=limit)
    pools: list[dict[str, Any]] = threadpool_info()
    log.info("native thread pools limited to %d thread(s): %s", limit,
             ", ".join(f"{p.get('internal_api')}={p.get('num_threads')}" for p in pools) or "none loaded")
    return pools


class NativeThreadsCollector(Collector):
    """`smallfirst_native_threads{api,library}` (e.g. api="blas", library="openblas"): the threads each
    native pool of this process may use, read from the libraries at scrape time (so a reset shows)."""

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("smallfirst_native_threads", "Threads a native thread pool (BLAS, OpenMP) of "
                                 "this worker process may use.", labels=["api", "library"])

    def collect(self) -> Iterable[Metric]:
        from threadpoolctl import threadpool_info

        family = self._family()
        for pool in threadpool_info():
            family.add_metric([str(pool.get("user_api", "")), str(pool.get("internal_api", ""))],
                              float(pool.get("num_threads", 0)))
        return [family]


_registered: set[int] = set()


def register_native_threads_collector(registry: CollectorRegistry | None = None) -> None:
    """Add the collector to `registry` (the default one: what the pool's metrics server serves), once."""
    target = REGISTRY if registry is None else registry
    if id(target) not in _registered:
        target.register(NativeThreadsCollector())
        _registered.add(id(target))

"""Redis goes away under a stream of jobs, by a crash (SIGKILL, restarted on its AOF) and by a graceful
restart (SHUTDOWN) repeated: every job the API accepted ends, none is answered twice, none billed twice.
Real redis-server, API, Celery workers and frontier simulator, each a process."""

from __future__ import annotations

import json

import pytest

from smallfirst.cli.job_stream import FRONTIER_JOB, JobStream, StreamReport
from smallfirst.cli.stack import Stack
from smallfirst.common import constants as k
from smallfirst.common.tenants import IssuedTenant

pytestmark = pytest.mark.faults

JOBS = 150
RATE_PER_S = 20.0
SETTLE_S = 180.0


def explain(report: StreamReport, stack: Stack) -> str:
    return (json.dumps({**report.figures(), "refused": report.refused, "statuses": report.statuses,
                        "errors": report.errors, "stuck_jobs": report.stuck_jobs}, indent=1, default=str)[:6000]
            + "\n" + stack[f"worker-{k.POOL_FRONTIER}"].tail(60))


def test_redis_killed_and_restarted_on_its_aof_mid_stream_loses_no_accepted_job(
        fault_stack: Stack, fault_tenant: IssuedTenant) -> None:
    # given: a stream of frontier jobs, 20 a second
    stream = JobStream(fault_stack.api_url, fault_tenant.api_key, [FRONTIER_JOB], count=JOBS, rate_per_s=RATE_PER_S)

    # when: Redis is SIGKILLed a third of the way through, and started again on its AOF 2 s later
    stream.run(at_job={JOBS // 3: lambda: fault_stack.restart_redis(graceful=False, down_s=2.0)})

    # then: every job the API accepted ended, once, billed once; and some were accepted after the crash
    report = stream.audit(settle_s=SETTLE_S)
    assert report.accepted > JOBS // 3, explain(report, fault_stack)
    assert report.clean, explain(report, fault_stack)
    assert report.statuses["succeeded"] == report.accepted, explain(report, fault_stack)


def test_redis_restarted_gracefully_three_times_mid_stream_loses_no_accepted_job(
        fault_stack: Stack, fault_tenant: IssuedTenant) -> None:
    # given: a stream of frontier jobs
    stream = JobStream(fault_stack.api_url, fault_tenant.api_key, [FRONTIER_JOB], count=JOBS, rate_per_s=RATE_PER_S)

    # when: Redis is shut down (SHUTDOWN) and started again three times while jobs arrive and run
    def restart() -> None:
        fault_stack.restart_redis(graceful=True, down_s=1.0)

    stream.run(at_job={30: restart, 70: restart, 110: restart})

    # then: every accepted job ended, once, billed once, and the frontier pool is still serving
    report = stream.audit(settle_s=SETTLE_S)
    assert report.clean, explain(report, fault_stack)
    assert report.statuses["succeeded"] == report.accepted, explain(report, fault_stack)
    assert fault_stack[f"worker-{k.POOL_FRONTIER}"].alive()

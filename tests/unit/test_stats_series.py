"""The time series the store keeps beside each tenant's stats (the dashboard's charts)."""

from __future__ import annotations

from smallfirst.common.store import series_fields


def test_series_keep_outcomes_per_task_and_leave_out_submissions() -> None:
    # given: the increments of a job that was submitted and ended in one write, served by the small tier
    increments: dict[str, float | int] = {"jobs_submitted": 1, "routed:small": 1, "jobs_ended": 1,
                                          "status:succeeded": 1, "served:small": 1, "cost_usd": 0.001,
                                          "input_tokens": 12, "output_tokens": 3}

    # when
    fields = series_fields("banking77_intent", increments)

    # then
    assert fields == {"banking77_intent/jobs_ended": 1, "banking77_intent/status:succeeded": 1,
                      "banking77_intent/served:small": 1, "banking77_intent/cost_usd": 0.001}
    assert isinstance(fields["banking77_intent/jobs_ended"], int)

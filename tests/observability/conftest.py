"""The observability fixtures (tests/observability_fixtures.py) for the tests in this folder, and the
frontier simulator (tests/frontier_fixtures.py) that the SDK tracing test calls."""

from tests.frontier_fixtures import frontier_sim, frontier_sim_session  # noqa: F401 - fixtures are found by name
from tests.observability_fixtures import otlp_receiver  # noqa: F401 - fixtures are found by name

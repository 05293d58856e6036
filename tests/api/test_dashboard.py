"""The dashboard under /ui, over HTTP (the browser tests in tests/browser drive it in Chromium):
sessions, CSRF, who sees what, the pages' contents, the live fragments."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from smallfirst.common.catalog import Catalog
from smallfirst.common.errors import InfrastructureError
from smallfirst.common.jobs import Tier
from smallfirst.common.store import JobStore
from smallfirst.common.tenants import IssuedTenant, TenantRegistry
from tests.api import worker_sim
from tests.api_fixtures import ApiServerFactory, TenantFactory

EMAIL = {"task": "email_summary", "input": {"text": "Please call me back about the invoice."}}

OPERATOR_KEY = "op-key-for-the-dashboard-tests"
BANKING = {"task": "banking77_intent", "input": {"text": "My transfer has not arrived."}}
CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def dashboard_url(api_server_factory: ApiServerFactory) -> str:
    return api_server_factory(operator_key=OPERATOR_KEY).url


def browser(url: str) -> httpx.Client:
    """A cookie-keeping client that does not follow redirects (the tests look at them)."""
    return httpx.Client(base_url=url, timeout=30, follow_redirects=False)


def log_in(client: httpx.Client, api_key: str) -> httpx.Response:
    form = client.get("/ui/login")
    token = CSRF.search(form.text)
    assert token is not None, form.text
    return client.post("/ui/login", data={"csrf_token": token.group(1), "api_key": api_key, "next": "/ui/jobs"})


ApiAs = Callable[[IssuedTenant], httpx.Client]


@pytest.fixture
def api_as(dashboard_url: str) -> Iterator[ApiAs]:
    """JSON API clients, one per tenant asked for."""
    clients: list[httpx.Client] = []

    def make(tenant: IssuedTenant) -> httpx.Client:
        client = httpx.Client(base_url=dashboard_url, headers={"Authorization": f"Bearer {tenant.api_key}"},
                              timeout=30)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def test_a_page_without_a_session_redirects_to_the_login_form(dashboard_url: str) -> None:
    # when
    with browser(dashboard_url) as client:
        response = client.get("/ui/jobs?status=failed")

    # then
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Dfailed"


def test_logging_in_with_a_tenant_key_sets_a_signed_httponly_samesite_strict_cookie(
        dashboard_url: str, tenant: IssuedTenant) -> None:
    with browser(dashboard_url) as client:
        # when
        response = log_in(client, tenant.api_key)

        # then
        assert response.status_code == 303
        assert response.headers["location"] == "/ui/jobs"
        cookie = next(v for k, v in response.headers.multi_items()
                      if k == "set-cookie" and v.startswith("sf_ui_session="))
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie
        assert tenant.api_key not in cookie
        page = client.get("/ui/jobs")
        assert page.status_code == 200
        assert tenant.tenant.id in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]


def test_a_wrong_key_or_a_missing_csrf_token_does_not_log_in(dashboard_url: str, tenant: IssuedTenant) -> None:
    with browser(dashboard_url) as client:
        # when: a wrong key
        wrong = log_in(client, "sf_live_not-a-key")
        # and: the right key without the login form's token
        forged = client.post("/ui/login", data={"api_key": tenant.api_key, "csrf_token": "guess"})

        # then
        assert wrong.status_code == 303
        assert "failed=true" in wrong.headers["location"]
        assert forged.status_code == 403
        assert client.get("/ui/jobs").status_code == 303


def test_a_forged_session_cookie_is_not_a_session(dashboard_url: str, tenant: IssuedTenant) -> None:
    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)
        cookie = client.cookies.get("sf_ui_session")
        assert cookie is not None
        body, _, signature = cookie.partition(".")
        client.cookies.clear()

        # when: the signature of another body
        client.cookies.set("sf_ui_session", f"{body}x.{signature}", path="/ui")
        response = client.get("/ui/overview")

    # then
    assert response.status_code == 303


def test_a_tenant_sees_only_its_own_jobs_and_another_tenants_job_is_not_found(
        dashboard_url: str, tenant_factory: TenantFactory, api_as: ApiAs) -> None:
    # given: two tenants with a job each
    acme, globex = tenant_factory("acme"), tenant_factory("globex")
    own = api_as(acme).post("/v1/jobs", json=BANKING).json()["id"]
    other = api_as(globex).post("/v1/jobs", json=BANKING).json()["id"]

    with browser(dashboard_url) as client:
        log_in(client, acme.api_key)

        # when
        listing = client.get("/ui/jobs")
        foreign = client.get(f"/ui/jobs/{other}")

    # then
    assert own in listing.text
    assert other not in listing.text
    assert foreign.status_code == 404
    assert globex.tenant.id not in foreign.text


def test_the_operator_sees_every_tenants_jobs_with_a_tenant_column_and_the_queues(
        dashboard_url: str, tenant_factory: TenantFactory, api_as: ApiAs) -> None:
    # given: three jobs of two tenants
    acme, globex = tenant_factory("acme"), tenant_factory("globex")
    ids = [api_as(t).post("/v1/jobs", json=BANKING).json()["id"] for t in (acme, globex, acme)]

    with browser(dashboard_url) as client:
        log_in(client, OPERATOR_KEY)

        # when
        listing = client.get("/ui/jobs")
        only_globex = client.get("/ui/jobs", params={"tenant": globex.tenant.id})
        overview = client.get("/ui/overview")

    # then: newest first over both tenants
    positions = [listing.text.index(job_id) for job_id in reversed(ids)]
    assert positions == sorted(positions)
    assert "<th scope=\"col\">Tenant</th>" in listing.text
    assert ids[1] in only_globex.text
    assert ids[0] not in only_globex.text
    assert ids[2] not in only_globex.text
    assert "Messages waiting per queue" in overview.text
    assert "operator" in overview.text


def test_the_operators_list_pages_through_every_tenants_jobs_once_each(
        dashboard_url: str, tenant_factory: TenantFactory, api_as: ApiAs) -> None:
    # given: 30 jobs alternating between two tenants (the page holds 25)
    tenants = [tenant_factory("acme"), tenant_factory("globex")]
    ids = {api_as(tenants[i % 2]).post("/v1/jobs", json=BANKING).json()["id"] for i in range(30)}

    with browser(dashboard_url) as client:
        log_in(client, OPERATOR_KEY)

        # when: following "Older jobs" to the end
        seen: list[str] = []
        url: str | None = "/ui/jobs"
        while url:
            page = client.get(url)
            seen.extend(re.findall(r'data-job="(job_[0-9a-f]+)"', page.text))
            found = re.search(r'<a class="button" href="([^"]+)" rel="next">', page.text)
            url = found.group(1).replace("&amp;", "&") if found else None

    # then
    assert sorted(seen) == sorted(ids)


def test_a_jobs_page_shows_its_attempts_validation_reasons_costs_and_answers(
        dashboard_url: str, tenant: IssuedTenant, api_as: ApiAs, job_store: JobStore) -> None:
    # given: a job whose small answer failed validation and that the frontier answered
    job_id = api_as(tenant).post("/v1/jobs", json=BANKING).json()["id"]
    worker_sim.escalate(job_store, job_id, reasons=["min_confidence: 0.21 < 0.40"], small_cost_usd=0.00005)
    worker_sim.succeed(job_store, job_id, tier=Tier.FRONTIER, answer={"label": "transfer_timing"}, cost_usd=0.003)

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)

        # when
        page = client.get(f"/ui/jobs/{job_id}").text

    # then
    assert 'data-attempt="1"' in page
    assert 'data-attempt="2"' in page
    assert "min_confidence: 0.21 &lt; 0.40" in page
    assert "transfer_timing" in page
    assert "$0.003050" in page  # both billed attempts
    assert 'class="tier t-frontier">frontier</span>' in page.split('data-field="served-by"')[1][:80]
    assert "data-live" not in page  # it ended: nothing to refresh
    assert "test-worker" not in page  # the worker's host name is the operator's business


def test_the_operator_sees_which_worker_ran_each_attempt(
        dashboard_url: str, tenant: IssuedTenant, api_as: ApiAs, job_store: JobStore) -> None:
    # given: a job that a worker answered
    job_id = api_as(tenant).post("/v1/jobs", json=BANKING).json()["id"]
    worker_sim.succeed(job_store, job_id, answer={"label": "card_arrival"})

    with browser(dashboard_url) as client:
        log_in(client, OPERATOR_KEY)

        # when
        page = client.get(f"/ui/jobs/{job_id}").text

    # then
    assert "test-worker" in page


def test_the_live_fragment_of_a_running_job_is_only_its_live_part(
        dashboard_url: str, tenant: IssuedTenant, api_as: ApiAs) -> None:
    # given: a job still queued
    job_id = api_as(tenant).post("/v1/jobs", json=BANKING).json()["id"]

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)

        # when
        full = client.get(f"/ui/jobs/{job_id}").text
        fragment = client.get(f"/ui/jobs/{job_id}", headers={"X-Dashboard-Fragment": "live"}).text

    # then
    assert f'data-live="/ui/jobs/{job_id}"' in full
    assert "<html" not in fragment
    assert job_id in fragment
    assert "st-queued" in fragment


def test_the_overview_counts_jobs_per_tier_escalations_and_savings(
        dashboard_url: str, tenant: IssuedTenant, api_as: ApiAs, job_store: JobStore) -> None:
    # given: one job answered by the small tier, one escalated and answered by the frontier
    api = api_as(tenant)
    small_job, escalated_job = (api.post("/v1/jobs", json=BANKING).json()["id"] for _ in range(2))
    worker_sim.succeed(job_store, small_job, answer={"label": "card_arrival"}, cost_usd=0.0001,
                       estimated_frontier_cost_usd=0.002)
    worker_sim.escalate(job_store, escalated_job, reasons=["choice: not a label"], small_cost_usd=0.0001)
    worker_sim.succeed(job_store, escalated_job, tier=Tier.FRONTIER, answer={"label": "card_arrival"},
                       cost_usd=0.003)

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)

        # when
        page = client.get("/ui/overview").text

    # then: the chart's description counts both tiers; the escalation reason and its rate are shown
    assert "answered by small: 1, answered by frontier: 1, failed: 0, cancelled: 0" in page
    assert "choice \u00d7 1" in page
    assert "50.0 %" in page
    # all-frontier = 0.003 paid to the frontier + 0.002 estimated for the small answer; spent 0.0032
    assert "$0.005000" in page
    assert "$0.001800" in page
    # nothing was batched: the batch figures are shown, at zero, apart from the small tier's savings
    assert '<dd data-figure="batch-savings">$0.000000</dd>' in page
    assert "Messages waiting per queue" not in page  # queues are the operator's


def test_dead_letters_are_listed_with_their_reasons_and_a_replay_button(
        dashboard_url: str, tenant: IssuedTenant, api_as: ApiAs, job_store: JobStore, catalog: Catalog) -> None:
    # given: a frontier-routed job whose frontier attempt failed past its (tiny) deadline
    job_id = api_as(tenant).post("/v1/jobs", json={**EMAIL, "deadline_s": 0.001}).json()["id"]
    worker_sim.fail_by_outcome(job_store, catalog, job_id, InfrastructureError("frontier down"))

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)

        # when
        page = client.get("/ui/dead-letters").text

    # then
    assert f'data-dead-letter="{job_id}"' in page
    assert "<code>deadline_exceeded</code>" in page
    assert f'action="/ui/jobs/{job_id}/replay"' in page


def test_a_revoked_key_ends_the_sessions_it_opened(dashboard_url: str, tenant: IssuedTenant, redis_url: str) -> None:
    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)
        assert client.get("/ui/overview").status_code == 200

        # when
        TenantRegistry(redis.Redis.from_url(redis_url)).revoke_key(tenant.tenant.id, tenant.api_key)

        # then
        assert client.get("/ui/overview").status_code == 303


def test_logging_out_needs_the_sessions_csrf_token(dashboard_url: str, tenant: IssuedTenant) -> None:
    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)
        page = client.get("/ui/overview").text
        token = CSRF.search(page)
        assert token is not None

        # when: without, then with the token
        refused = client.post("/ui/logout", data={"csrf_token": "nope"})
        accepted = client.post("/ui/logout", data={"csrf_token": token.group(1)})

        # then
        assert refused.status_code == 403
        assert accepted.status_code == 303
        assert client.get("/ui/overview").status_code == 303


def test_a_job_id_typed_into_the_search_opens_that_job(dashboard_url: str, tenant: IssuedTenant,
                                                       api_as: ApiAs) -> None:
    # given
    job_id = api_as(tenant).post("/v1/jobs", json=BANKING).json()["id"]

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)

        # when
        response = client.get("/ui/jobs", params={"q": job_id})

    # then
    assert response.status_code == 303
    assert response.headers["location"] == f"/ui/jobs/{job_id}"


def test_replaying_a_failed_job_that_is_not_a_dead_letter_is_refused(dashboard_url: str, tenant: IssuedTenant,
                                                                      api_as: ApiAs, job_store: JobStore) -> None:
    # given: a job failed without a dead-letter entry, and the session's CSRF token
    job_id = api_as(tenant).post("/v1/jobs", json=BANKING).json()["id"]
    worker_sim.fail(job_store, job_id, code="deadline_exceeded")
    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)
        token = CSRF.search(client.get(f"/ui/jobs/{job_id}").text)
        assert token is not None

        # when
        response = client.post(f"/ui/jobs/{job_id}/replay", data={"csrf_token": token.group(1)})

    # then
    assert response.status_code == 409
    assert "job_not_dead_lettered" in response.text


def test_the_overview_shows_the_tenants_frontier_budget(dashboard_url: str, tenant: IssuedTenant,
                                                        redis_url: str) -> None:
    # given: a daily frontier budget of one dollar
    TenantRegistry(redis.Redis.from_url(redis_url)).update(tenant.tenant.id, limits={"budget_daily_usd": 1.0})

    with browser(dashboard_url) as client:
        log_in(client, tenant.api_key)
        # when
        page = client.get("/ui/overview").text

    # then
    assert '<dd data-figure="budget">day: $0.000000 of $1.00 (ok; policy small_only)</dd>' in page

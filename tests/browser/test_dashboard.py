"""The dashboard in a real browser, against the real stack: a tenant logs in with the keyboard, sees
a job the small tier answered and one that escalated, opens the escalated one, watches a figure
update without a reload; the operator sees every tenant; failed jobs are listed with their codes.
Screenshots of each page go to the test artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from smallfirst.cli.stack import Stack
from smallfirst.common.tenants import IssuedTenant
from tests.browser.conftest import DESKTOP, OPERATOR_KEY, PHONE
from tests.e2e.conftest import INVOICE_TEXT, submit_and_wait

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.vllm]

WAIT_S = 30
# A Banking77 message the embedding model classifies confidently (tests/e2e: answered by the small tier).
SMALL_TEXT = "I am still waiting on my card?"


@pytest.fixture(scope="module")
def finished_jobs(tenant_api: httpx.Client) -> dict[str, dict[str, Any]]:
    """A job the small tier answered, one it escalated to the frontier, one that failed (local only)."""
    small = submit_and_wait(tenant_api, {"task": "banking77_intent", "input": {"text": SMALL_TEXT}})
    escalated = submit_and_wait(tenant_api, {"task": "invoice_fields", "input": {"text": INVOICE_TEXT}})
    failed = submit_and_wait(tenant_api, {"task": "invoice_fields", "input": {"text": INVOICE_TEXT},
                                          "local_only": True})
    assert small["status"] == "succeeded", small
    assert [a["tier"] for a in escalated["attempts"]] == ["small", "frontier"], escalated
    assert failed["status"] == "failed", failed
    return {"small": small, "escalated": escalated, "failed": failed}


def shoot(driver: WebDriver, artifacts_dir: Path, name: str) -> Path:
    """A full-page screenshot (the window grown to the page's height, then put back)."""
    width, height = driver.get_window_size()["width"], driver.get_window_size()["height"]
    page_height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    driver.set_window_size(width, max(height, page_height + 120))
    path = artifacts_dir / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(width, height)
    return path


def wait_for(driver: WebDriver, css: str) -> Any:
    return WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.CSS_SELECTOR, css))


@pytest.fixture(scope="module")
def tenant_session(driver: WebDriver, dashboard_stack: Stack, dashboard_tenant: IssuedTenant,
                   finished_jobs: dict[str, dict[str, Any]]) -> WebDriver:
    """The browser logged in as the module's tenant, through the login form, with the keyboard only."""
    driver.delete_all_cookies()
    driver.get(f"{dashboard_stack.api_url}/ui/overview")
    key_field = wait_for(driver, "input#api_key")
    assert driver.switch_to.active_element == key_field  # the form's only field has the focus
    key_field.send_keys(dashboard_tenant.api_key, Keys.ENTER)
    wait_for(driver, "[data-figure='served-small']")
    return driver


def test_a_tenant_sees_the_small_answer_and_the_escalation_on_the_overview(
        tenant_session: WebDriver, artifacts_dir: Path) -> None:
    # given: logged in as the tenant, on the overview (where the login form led back to)
    driver = tenant_session
    assert driver.current_url.endswith("/ui/overview")

    # then: one answer from each tier, one escalation with its reason, what it cost and saved
    assert driver.find_element(By.CSS_SELECTOR, "[data-figure='served-small']").text == "1"
    assert driver.find_element(By.CSS_SELECTOR, "[data-figure='served-frontier']").text == "1"
    per_task = driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby='h-tasks']").text
    assert "invoice_fields" in per_task
    assert "banking77_intent" in per_task
    assert driver.find_element(By.CSS_SELECTOR, "#h-tiers + .chart-scroll svg title").get_attribute("textContent") \
        == "Jobs ended per tier, last 1h"
    assert "Messages waiting per queue" not in driver.page_source  # the queues are the operator's
    shoot(driver, artifacts_dir, "overview-tenant")


def test_the_jobs_list_shows_both_jobs_and_marks_the_escalated_one(
        tenant_session: WebDriver, dashboard_stack: Stack, finished_jobs: dict[str, dict[str, Any]],
        artifacts_dir: Path) -> None:
    # when: the tenant follows the "Jobs" link of the navigation
    driver = tenant_session
    driver.find_element(By.LINK_TEXT, "Jobs").click()
    small_row = wait_for(driver, f"tr[data-job='{finished_jobs['small']['id']}']")
    escalated_row = driver.find_element(By.CSS_SELECTOR, f"tr[data-job='{finished_jobs['escalated']['id']}']")

    # then
    assert "succeeded" in small_row.text
    assert "escalated" not in small_row.text
    assert "small" in small_row.text
    assert "escalated" in escalated_row.text
    assert "frontier" in escalated_row.text
    shoot(driver, artifacts_dir, "jobs-tenant")


def test_opening_the_escalated_job_shows_its_attempts_reasons_answer_and_trace(
        tenant_session: WebDriver, dashboard_stack: Stack, finished_jobs: dict[str, dict[str, Any]],
        artifacts_dir: Path) -> None:
    # given: the jobs list
    driver = tenant_session
    escalated = finished_jobs["escalated"]
    driver.get(f"{dashboard_stack.api_url}/ui/jobs")
    link = wait_for(driver, f"tr[data-job='{escalated['id']}'] a")

    # when: the job's link is reached with the keyboard and opened with Enter
    link.send_keys(Keys.ENTER)
    wait_for(driver, "[data-attempt='2']")

    # then: the rejected small attempt with its validation reasons, the accepted frontier attempt
    first = driver.find_element(By.CSS_SELECTOR, "[data-attempt='1']")
    second = driver.find_element(By.CSS_SELECTOR, "[data-attempt='2']")
    assert "small" in first.text
    assert "rejected" in first.text
    reasons = first.find_elements(By.CSS_SELECTOR, "ul.reasons li")
    assert [r.text for r in reasons] == escalated["attempts"][0]["verdict"]["reasons"]
    assert "frontier" in second.text
    assert "accepted" in second.text
    assert driver.find_element(By.CSS_SELECTOR, "[data-field='served-by']").text == "frontier"
    assert driver.find_element(By.CSS_SELECTOR, "[data-field='trace-id']").text == (
        escalated["trace_id"] or "none (tracing off)")
    assert "INV-2041" in driver.find_element(By.CSS_SELECTOR, "section[aria-labelledby='h-result']").text
    shoot(driver, artifacts_dir, "job-escalated")


def test_a_job_page_fits_a_phone_screen(tenant_session: WebDriver, dashboard_stack: Stack,
                                        finished_jobs: dict[str, dict[str, Any]], artifacts_dir: Path) -> None:
    # given: a phone-sized viewport
    driver = tenant_session
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": PHONE[0], "height": PHONE[1], "deviceScaleFactor": 2, "mobile": True})
    try:
        # when
        driver.get(f"{dashboard_stack.api_url}/ui/jobs/{finished_jobs['escalated']['id']}")
        wait_for(driver, "[data-attempt='2']")

        # then: nothing is wider than the screen (no sideways scrolling of the page)
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0
        shoot(driver, artifacts_dir, "job-escalated-phone")
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.set_window_size(*DESKTOP)


def test_the_overview_updates_without_a_reload_when_a_job_ends(
        tenant_session: WebDriver, dashboard_stack: Stack, tenant_api: httpx.Client) -> None:
    # given: the overview open, marked so that a reload would show
    driver = tenant_session
    driver.get(f"{dashboard_stack.api_url}/ui/overview")
    before = int(wait_for(driver, "[data-figure='served-small']").text)
    driver.execute_script("window.__notReloaded = true")

    # when: another job is answered by the small tier (the text of the first small answer)
    job = submit_and_wait(tenant_api, {"task": "banking77_intent", "input": {"text": SMALL_TEXT}})
    assert [(a["tier"], a["outcome"]) for a in job["attempts"]] == [("small", "accepted")], job

    # then: the figure changes in place
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "[data-figure='served-small']").text == str(before + 1))
    assert driver.execute_script("return window.__notReloaded") is True


def test_a_dead_letter_is_listed_with_its_reason_and_replayed_from_the_page(
        tenant_session: WebDriver, dashboard_stack: Stack, finished_jobs: dict[str, dict[str, Any]],
        tenant_api: httpx.Client, artifacts_dir: Path) -> None:
    # given: the local-only invoice whose small answer failed validation is a dead letter
    driver = tenant_session
    driver.find_element(By.LINK_TEXT, "Dead letters").click()
    failed = finished_jobs["failed"]
    row = wait_for(driver, f"tr[data-dead-letter='{failed['id']}']")
    assert "validation_failed" in row.text
    shoot(driver, artifacts_dir, "dead-letters-tenant")

    # when: its Replay button is pressed
    row.find_element(By.TAG_NAME, "button").click()

    # then: the job's page says a replay was requested, and the job runs again with its history kept
    notice = wait_for(driver, "p.notice[role='status']")
    assert "Replay requested" in notice.text
    deadline = time.monotonic() + WAIT_S
    job = tenant_api.get(f"/v1/jobs/{failed['id']}").json()
    while job["status"] not in ("failed", "succeeded") or len(job["attempts"]) < 2:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
        job = tenant_api.get(f"/v1/jobs/{failed['id']}").json()
    assert len(job["attempts"]) == len(failed["attempts"]) + 1, job
    shoot(driver, artifacts_dir, "dead-letter-replayed")


def test_the_operator_sees_every_tenant_and_the_queues(
        driver: WebDriver, dashboard_stack: Stack, dashboard_tenant: IssuedTenant,
        finished_jobs: dict[str, dict[str, Any]], artifacts_dir: Path) -> None:
    # given: a new session, logged in with the operator key
    driver.delete_all_cookies()
    driver.get(f"{dashboard_stack.api_url}/ui/login")
    wait_for(driver, "input#api_key").send_keys(OPERATOR_KEY, Keys.ENTER)
    wait_for(driver, "[data-figure='served-small']")

    # then: the queues, and the tenant of each job in the list
    assert "Messages waiting per queue" in driver.page_source
    assert driver.find_element(By.CSS_SELECTOR, ".role-operator").text == "operator"
    shoot(driver, artifacts_dir, "overview-operator")
    driver.find_element(By.LINK_TEXT, "Jobs").click()
    row = wait_for(driver, f"tr[data-job='{finished_jobs['small']['id']}']")
    assert dashboard_tenant.tenant.id in row.text


def test_the_first_tab_reaches_the_skip_link_and_it_moves_focus_to_the_content(
        driver: WebDriver, dashboard_stack: Stack, dashboard_tenant: IssuedTenant) -> None:
    # given: any page
    driver.get(f"{dashboard_stack.api_url}/ui/jobs")
    wait_for(driver, "main#content")

    # when: the first Tab, then Enter on what it reached
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    first = driver.switch_to.active_element
    reached = (first.get_attribute("textContent"), first.get_attribute("class"))
    first.send_keys(Keys.ENTER)

    # then: the skip link (shown while focused), and then the main content has the focus
    assert reached == ("Skip to content", "skip")
    assert driver.switch_to.active_element.get_attribute("id") == "content"

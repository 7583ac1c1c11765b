"""The dashboard in a real browser, against a real server and a real worker.

Headless Chromium (Playwright) drives the pages the way an operator does:
it filters the runs to a failed one, reads its traceback, resumes it and
watches it complete in the live region; sends an event to a waiting run;
triggers, pauses and resumes a schedule; opens runs whose data carries
markup. The fixtures are in this directory's ``conftest.py``. Each test also
fails on an uncaught script error, a response of status 500 or above, or an
error logged by the dashboard or the worker while its page was open.

Screenshots of the pages (1280x800) are written to ``docs/images/`` for the
docs each time the module runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Locator, Page, expect

from .conftest import (
    GATES,
    IDEMPOTENCY_KEY,
    SCHEDULE_KEY,
    Gate,
    PageProblems,
    Site,
    expense_approval,
    invoice_sync,
    nightly_report,
    support_ticket,
)

pytestmark = pytest.mark.slow

Shoot = Callable[[Page, str], None]


def run_status(page: Page) -> Locator:
    return page.locator("#run-status")


def test_a_failed_run_is_found_read_resumed_and_seen_completing_live(
    page: Page, site: Site, shoot: Shoot
) -> None:
    gate = GATES.setdefault("main", Gate())
    run_id = site.enqueue(invoice_sync, {"invoice": "INV-1042", "amount": 1299, "gate": "main"})
    site.wait_status(run_id, "failed")

    page.goto("/")
    expect(page.locator("h1")).to_have_text("Overview")
    expect(page.locator('#status-counts [data-status="waiting"]')).to_contain_text("1")
    expect(page.locator('table#queue tr[data-workflow="expense-approval"]')).to_be_visible()
    expect(page.locator("table#workers tr[data-worker]")).to_have_count(1)
    expect(page.locator("svg#history-hour")).to_be_visible()
    expect(page.locator("svg#history-day")).to_be_visible()

    page.get_by_role("navigation", name="Sections").get_by_role("link", name="Runs").click()
    expect(page.locator("form#run-filter")).to_be_visible()
    expect(page.locator("table#runs")).to_be_visible()

    form = page.locator("form#run-filter")
    form.locator("select[name=status]").select_option("failed")
    form.locator("select[name=workflow]").select_option("invoice-sync")
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    assert "status=failed" in page.url
    assert "workflow=invoice-sync" in page.url
    rows = page.locator("table#runs tr[data-run-id]")
    expect(rows.first).to_be_visible()
    for status in rows.locator("td.status").all_inner_texts():
        assert status.strip() == "failed"
    for name in rows.locator("td.workflow").all_inner_texts():
        assert name.strip() == "invoice-sync"

    row = page.locator(f'table#runs tr[data-run-id="{run_id}"]')
    row.locator("a.run-link").click()
    page.wait_for_url(re.compile(rf"/runs/{run_id}$"))
    expect(run_status(page)).to_have_text("failed")
    expect(page.locator("#run-workflow")).to_have_text("invoice-sync")
    expect(page.locator("pre#run-input")).to_contain_text("INV-1042")
    traceback = page.locator("#run-error pre.traceback")
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("in post_to_ledger")
    expect(traceback).to_contain_text(
        "LedgerUnavailableError: ledger unavailable while posting INV-1042"
    )
    expect(page.locator('table#steps tr[data-step="fetch"]')).to_contain_text("completed")
    expect(page.locator('table#steps tr[data-step="post"]')).to_contain_text("failed")
    shoot(page, "run")

    # The ledger is back; the resumed run holds at the gate until the page
    # has loaded, so its completion can only arrive through the live region.
    gate.failing = False
    with page.expect_navigation():
        page.locator("form#resume-form [type=submit]").click()
    expect(page.locator("#flash")).to_be_visible()
    expect(run_status(page)).not_to_have_text("failed")
    page.evaluate("() => { window.__sameDocument = true }")
    navigations: list[str] = []
    page.on("framenavigated", lambda frame: navigations.append(frame.url))
    assert gate.entered.wait(10), "the resumed run never reached its step again"
    gate.release()
    expect(run_status(page)).to_have_text("completed", timeout=10_000)
    assert page.evaluate("() => window.__sameDocument") is True
    assert navigations == []
    expect(page.locator("pre#run-output")).to_contain_text("LE-1299")
    expect(page.locator('table#steps tr[data-step="post"]')).to_contain_text("completed")
    assert site.wait_status(run_id, "completed").output["posted"] == "INV-1042"


def test_an_event_sent_from_the_form_lets_a_waiting_run_continue(page: Page, site: Site) -> None:
    run_id = site.enqueue(expense_approval, {"claim": "EXP-311", "amount": 480})
    site.wait_status(run_id, "waiting")

    page.goto(f"/runs/{run_id}")
    expect(run_status(page)).to_have_text("waiting")
    form = page.locator("form#event-form")
    form.locator("input[name=event]").fill("approval")
    form.locator("textarea[name=payload]").fill('{"approved": true, "by": "dana@finance"}')
    form.locator("input[name=event_id]").fill("approval-EXP-311")
    with page.expect_navigation():
        form.locator("[type=submit]").click()
    expect(page.locator("#flash")).to_be_visible()
    expect(run_status(page)).to_have_text("completed", timeout=10_000)
    expect(page.locator("pre#run-output")).to_contain_text("claim EXP-311 approved by dana@finance")
    expect(page.locator('table#steps tr[data-step="record"]')).to_contain_text("completed")
    assert site.wait_status(run_id, "completed").output == "claim EXP-311 approved by dana@finance"


def test_a_schedule_is_triggered_paused_and_resumed(page: Page, site: Site) -> None:
    before = {run.id for run in site.call(site.engine.list_runs(workflow=nightly_report.name)).runs}
    page.goto("/schedules")
    row = page.locator(f'table#schedules tr[data-schedule="{SCHEDULE_KEY}"]')
    expect(row).to_contain_text("nightly-report")

    with page.expect_navigation():
        row.locator("form.trigger-form [type=submit]").click()
    expect(page.locator("#flash")).to_be_visible()
    new = [
        run
        for run in site.call(site.engine.list_runs(workflow=nightly_report.name)).runs
        if run.id not in before
    ]
    assert len(new) == 1, new
    assert new[0].input == {"team": "ops"}
    site.wait_status(new[0].id, "completed")
    page.goto("/runs?workflow=nightly-report")
    expect(page.locator(f'table#runs tr[data-run-id="{new[0].id}"]')).to_be_visible()

    page.goto("/schedules")
    with page.expect_navigation():
        row.locator("form.pause-form [type=submit]").click()
    expect(page.locator("#flash")).to_be_visible()
    expect(row).to_contain_text("paused")
    expect(row.locator("form.resume-form")).to_have_count(1)
    assert _schedule(site, SCHEDULE_KEY).paused

    with page.expect_navigation():
        row.locator("form.resume-form [type=submit]").click()
    expect(page.locator("#flash")).to_be_visible()
    expect(row.locator("form.pause-form")).to_have_count(1)
    assert not _schedule(site, SCHEDULE_KEY).paused


def _schedule(site: Site, key: str) -> Any:
    (found,) = [s for s in site.call(site.engine.list_schedules()) if s.key == key]
    return found


def test_a_child_run_links_to_its_parent(page: Page, site: Site) -> None:
    (parent,) = site.call(site.engine.list_runs(workflow="fulfil-order")).runs
    (child,) = site.call(site.engine.list_runs(workflow="shipping-label")).runs
    page.goto(f"/runs/{parent.id}")
    expect(page.locator("#children")).to_contain_text(child.id)
    page.goto(f"/runs/{child.id}")
    page.locator("a#parent-link").click()
    page.wait_for_url(re.compile(rf"/runs/{parent.id}$"))
    expect(page.locator("#run-workflow")).to_have_text("fulfil-order")


def test_runs_are_found_by_key_and_by_id_and_paged(page: Page, site: Site) -> None:
    (keyed,) = [
        run
        for run in site.call(site.engine.list_runs(workflow=invoice_sync.name, limit=100)).runs
        if run.idempotency_key == IDEMPOTENCY_KEY
    ]
    page.goto("/runs")
    form = page.locator("form#run-filter")
    form.locator("input[name=q]").fill(IDEMPOTENCY_KEY)
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    rows = page.locator("table#runs tr[data-run-id]")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-run-id", keyed.id)

    form.locator("input[name=q]").fill(keyed.id)
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(rf"/runs/{keyed.id}$"))
    expect(run_status(page)).to_have_text("completed")

    # invoice-sync, which no schedule starts: no run appears meanwhile.
    page.goto("/runs?workflow=invoice-sync&limit=3")
    first = rows.evaluate_all("rows => rows.map(r => r.dataset.runId)")
    assert len(first) == 3
    page.locator("a#next-page").click()
    expect(page.locator("a#first-page")).to_be_visible()
    second = rows.evaluate_all("rows => rows.map(r => r.dataset.runId)")
    assert len(second) == 3
    assert not set(first) & set(second)
    newest = site.call(site.engine.list_runs(workflow=invoice_sync.name, limit=6)).runs
    assert first + second == [r.id for r in newest]


def test_screenshots_of_every_page(page: Page, site: Site, shoot: Shoot) -> None:
    page.goto("/")
    expect(page.locator("h1")).to_have_text("Overview")
    shoot(page, "overview")
    page.goto("/runs")
    expect(page.locator("table#runs tr[data-run-id]").first).to_be_visible()
    shoot(page, "runs")
    page.goto("/schedules")
    expect(page.locator(f'table#schedules tr[data-schedule="{SCHEDULE_KEY}"]')).to_be_visible()
    shoot(page, "schedules")
    page.goto("/workers")
    expect(page.locator("table#workers tr[data-worker]")).to_have_count(1)
    shoot(page, "workers")


SCRIPT = "<script>window.__xss = 1; alert('script')</script>"
IMAGE = "<img src=x onerror=window.__xss=2;alert(2)>"
PAYLOAD = f"{SCRIPT} and {IMAGE}"


def assert_inert(page: Page, problems: PageProblems) -> None:
    """Nothing of the payloads became markup, and nothing ran. The DOM is
    checked, not only the dialogs: the page's Content-Security-Policy would
    keep an injected script from running, so escaping is what is tested."""
    assert problems.dialogs == []
    assert page.evaluate("() => window.__xss") is None
    assert page.locator("[onerror]").count() == 0
    assert page.locator("img[src=x]").count() == 0
    scripts = page.locator("script").evaluate_all("els => els.map(e => e.textContent)")
    assert [text for text in scripts if "__xss" in text] == []


def test_markup_in_run_data_is_shown_as_text(
    page: Page, site: Site, problems: PageProblems
) -> None:
    failed = site.enqueue(support_ticket, {"note": PAYLOAD, "explode": True})
    completed = site.enqueue(support_ticket, {"note": PAYLOAD, "explode": False})
    waiting = site.enqueue(expense_approval, {"claim": PAYLOAD, "amount": 1})
    site.wait_status(failed, "failed")
    site.wait_status(completed, "completed")
    site.wait_status(waiting, "waiting")

    # Input, a step's output and the error message, and its traceback.
    page.goto(f"/runs/{failed}")
    expect(run_status(page)).to_have_text("failed")
    expect(page.locator("pre#run-input")).to_contain_text(SCRIPT)
    expect(page.locator("pre#run-input")).to_contain_text(IMAGE)
    echo = page.locator('table#steps tr[data-step="receive"] td.output')
    echo.locator("summary").click()
    expect(echo.locator("pre")).to_contain_text(IMAGE)
    expect(page.locator("#run-error .error-message")).to_contain_text(SCRIPT)
    expect(page.locator("#run-error pre.traceback")).to_contain_text(f"ValueError: {PAYLOAD}")
    assert_inert(page, problems)

    # The run's output.
    page.goto(f"/runs/{completed}")
    expect(run_status(page)).to_have_text("completed")
    expect(page.locator("pre#run-output")).to_contain_text(IMAGE)
    assert_inert(page, problems)

    # The runs list, and a query reflected into the filter form.
    page.goto("/runs?workflow=support-ticket")
    expect(page.locator(f'table#runs tr[data-run-id="{failed}"]')).to_be_visible()
    assert_inert(page, problems)
    query = f'"><{SCRIPT[1:]}'
    page.goto("/runs?" + urlencode({"q": query, "workflow": "support-ticket"}))
    expect(page.locator("form#run-filter input[name=q]")).to_have_value(query)
    expect(page.locator("table#runs")).to_contain_text("No run has this id")
    assert_inert(page, problems)

    # An event whose name and payload carry markup: echoed in the flash
    # message, listed among the run's buffered events.
    page.goto(f"/runs/{waiting}")
    form = page.locator("form#event-form")
    form.locator("input[name=event]").fill(IMAGE)
    form.locator("textarea[name=payload]").fill(json.dumps({"note": SCRIPT}))
    form.locator("input[name=event_id]").fill(f'"><{SCRIPT[1:]}')
    with page.expect_navigation():
        form.get_by_role("button", name="Send event").click()
    expect(page.locator("#flash")).to_contain_text(IMAGE)
    buffered = page.locator("#buffered-events li[data-event]")
    expect(buffered).to_have_count(1)
    expect(buffered).to_contain_text(IMAGE)
    expect(buffered).to_contain_text(SCRIPT)
    assert_inert(page, problems)

    # A refused event: the form comes back with what was typed.
    form.locator("input[name=event]").fill(IMAGE)
    form.locator("textarea[name=payload]").fill(f"not json {SCRIPT}")
    with page.expect_navigation():
        form.get_by_role("button", name="Send event").click()
    expect(page.locator("#flash")).to_contain_text("not JSON")
    expect(form.locator("textarea[name=payload]")).to_have_value(f"not json {SCRIPT}")
    assert_inert(page, problems)

    page.goto("/")
    assert_inert(page, problems)

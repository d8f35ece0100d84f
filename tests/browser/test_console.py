"""The web console as a person uses it, in headless Chromium, against `flowledger serve` running
the document-processing example: executions list, execution page, inbox, workflow page.

Every wait is for something on the page or in the API (Playwright's `expect`, 30 s), never a
fixed time. Each page shown is saved in the artifacts folder (see console_driver).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from console_driver import WORKFLOW, Browsing, Console, submit, submit_button
from playwright.sync_api import Locator, Page, expect

TOKEN = "browser-api-token-7c41d2"
CONTRACT = "https://example.com/contract-7.pdf"  # waits at contract_review, assignee legal
UNKNOWN = "https://example.com/scan-0001.pdf"  # the classifier gives up: human_review, operations
REQUIRED = re.compile("required", re.IGNORECASE)


def invoice(n: int) -> str:
    """The URL of invoice number `n` (an invoice runs to its end by itself)."""
    return f"https://example.com/invoice-{n}.pdf"


# -- what the pages show -----------------------------------------------------------------------


def row(page: Page, execution_id: str) -> Locator:
    """An execution's row in the executions list."""
    return page.locator(f'table#executions tr.execution[data-execution-id="{execution_id}"]')


def node(page: Page, step: str) -> Locator:
    """A step's node in the execution page's graph."""
    return page.locator(f'#graph svg.step-graph g.node[data-step="{step}"]')


def bars(page: Page, key: str, kind: str, status: str | None = None) -> Locator:
    """A step instance's bars of one kind in the execution page's timeline."""
    having = f'[data-status="{status}"]' if status else ""
    return page.locator(
        f'#timeline svg.gantt rect.bar[data-key="{key}"][data-kind="{kind}"]{having}'
    )


def task_form(scope: Page | Locator, step: str) -> Locator:
    """The form answering a waiting human task."""
    return scope.locator(f'form.task-form[data-step="{step}"]')


def expect_status(page: Page, status: str) -> None:
    """Wait until the execution page shows the execution's status as `status`."""
    expect(page.locator("#execution-status")).to_have_attribute("data-status", status)


def expect_nodes(page: Page, status: str, *steps: str) -> None:
    """Wait until each step's graph node has `status`."""
    for step in steps:
        expect(node(page, step)).to_have_attribute("data-status", status)


def open_execution(browsing: Browsing, console: Console, execution_id: str, what: str) -> Page:
    """The execution page, once its status is shown."""
    browsing.visit(f"{console.url}/ui/executions/{execution_id}", what, ready="#execution-status")
    return browsing.page


def contract_waiting(console: Console) -> str:
    """A contract execution, once it waits for legal's review."""
    execution_id = console.start(CONTRACT)
    doc = console.wait(execution_id, "waiting")
    assert doc["waiting_for_person"] == ["contract_review"], doc
    return execution_id


# -- the scenarios -----------------------------------------------------------------------------


def test_a_contract_is_reviewed_on_its_execution_page_and_completes_live(
    browsing: Browsing, console: Console
) -> None:
    contract = contract_waiting(console)
    page = browsing.page

    browsing.visit(f"{console.url}/", "executions", ready="table#executions")
    expect(row(page, contract)).to_have_attribute("data-status", "waiting")
    row(page, contract).locator("a.execution-link").click()
    expect(page).to_have_url(re.compile(rf"/ui/executions/{contract}(\?.*)?$"))
    expect_status(page, "waiting")
    expect_nodes(page, "completed", "fetch", "ocr", "metadata")
    expect_nodes(page, "waiting", "contract_review")
    for key in ("fetch", "ocr", "metadata"):
        expect(bars(page, key, "attempt", "completed")).to_have_count(1)
    expect(bars(page, "contract_review", "waiting").first).to_be_attached()
    browsing.shot("execution-waiting")

    form = task_form(page, "contract_review")
    approved = form.locator('select[name="approved"]')
    expect(approved).to_have_value("")  # left unset
    submit_button(form).click()
    error = form.locator('.field-error[data-field="approved"]')
    expect(error).to_contain_text(REQUIRED)
    browsing.shot("task-refused")
    expect_status(page, "waiting")
    assert console.wait(contract, "waiting")["waiting_for_person"] == ["contract_review"]

    browsing.mark_document()
    browsing.watch(".task-done")
    approved.select_option("true")
    form.locator('[name="notes"]').fill("standard terms")
    submit_button(form).click()
    browsing.expect_seen(".task-done")
    expect_status(page, "completed")
    expect_nodes(page, "completed", "contract_review", "validate", "notify")
    assert browsing.still_same_document(), "the page was reloaded"
    doc = console.wait(contract, "completed")
    assert doc["data"]["contract_review"] == {"approved": True, "notes": "standard terms"}
    events = console.api.get(f"/executions/{contract}/events").json()["events"]
    expect(page.locator("#history table tr.event")).to_have_count(len(events))
    expect(page.locator("#audit")).to_have_attribute("data-ok", "true")
    first = page.locator("#history details#event-1")
    first.locator("summary").click()  # an event's attributes are fetched when opened
    expect(first.locator("pre")).to_contain_text('"workflow_id": "document-processing"')
    first.locator("summary").click()
    browsing.shot("execution-completed")
    browsing.save_as("execution-page.png")


def test_the_inbox_lists_a_persons_tasks_and_completes_one(
    browsing: Browsing, console: Console
) -> None:
    contract = contract_waiting(console)
    unknown = console.start(UNKNOWN)
    handler = "classify_unknown:on_error:human_review"  # assignee operations
    assert console.wait(unknown, "waiting")["waiting_for_person"] == [handler]
    page = browsing.page

    browsing.visit(f"{console.url}/ui/inbox?assignee=legal", "inbox-legal", ready="div.task")
    task = page.locator(f'div.task[data-execution-id="{contract}"][data-step="contract_review"]')
    expect(task).to_be_visible()
    expect(page.locator(f'div.task[data-execution-id="{unknown}"]')).to_have_count(0)

    form = task_form(task, "contract_review")
    form.locator('select[name="approved"]').select_option("true")
    submit_button(form).click()
    expect(page.locator(".task-done").first).to_be_visible()
    browsing.shot("task-done")
    console.wait(contract, "completed")

    browsing.visit(f"{console.url}/ui/inbox?assignee=legal", "inbox-legal-after")
    expect(page.locator(f'div.task[data-execution-id="{contract}"]')).to_have_count(0)


def test_cancelling_on_a_server_with_a_token_asks_for_the_token_first(
    browsing: Browsing, serve: Callable[..., Console]
) -> None:
    console = serve(TOKEN)
    console.register()
    contract = contract_waiting(console)
    page = browsing.page

    # Reads need no token: the browser has none, and the pages show the execution.
    browsing.visit(f"{console.url}/", "executions", ready="table#executions")
    expect(row(page, contract)).to_have_attribute("data-status", "waiting")
    open_execution(browsing, console, contract, "execution")
    expect_status(page, "waiting")

    dialog = page.locator("dialog#token-dialog")
    expect(dialog).to_be_hidden()
    page.locator('form#cancel-form input[name="reason"]').fill("duplicate upload")
    page.locator("button#cancel").click()
    expect(dialog).to_be_visible()
    browsing.shot("token-asked")

    dialog.locator("#token-input").fill("not-the-token")
    dialog.locator("#token-save").click()
    expect(dialog.locator("#token-error")).to_be_visible()
    expect(dialog.locator("#token-error")).not_to_be_empty()
    browsing.shot("token-refused")
    assert console.wait(contract, "waiting")["status"] == "waiting"

    dialog.locator("#token-input").fill(TOKEN)
    dialog.locator("#token-save").click()
    expect_status(page, "cancelled")
    browsing.shot("cancelled")
    assert console.wait(contract, "cancelled")["reason"] == "duplicate upload"


def test_the_workflow_page_shows_its_runs_and_applies_a_recommendation(
    browsing: Browsing, console: Console
) -> None:
    started = [console.start(invoice(2000 + n)) for n in range(1, 25)]
    statuses = console.wait_all_ended(started)
    assert list(statuses.values()).count("completed") >= 20, statuses
    report = console.api.get(f"/workflows/{WORKFLOW}/optimizer").json()
    assert report["recommendations"], report  # what the page is to offer
    page = browsing.page

    browsing.visit(f"{console.url}/ui/workflows", "workflows", ready="table#workflows")
    expect(page.locator(f'tr.workflow[data-workflow-id="{WORKFLOW}"]')).to_be_visible()

    browsing.visit(f"{console.url}/ui/workflows/{WORKFLOW}", "workflow", ready="#versions")
    expect(page.locator('#versions .version[data-version="1.0"]')).to_be_visible()
    expect(page.locator("#percentiles canvas").first).to_be_visible()  # uPlot's chart
    for step in ("fetch", "ocr", "metadata", "validate", "notify"):
        expect(page.locator(f'table#step-performance tr.step[data-step="{step}"]')).to_be_visible()
    expect(page.locator('#sla .sla[data-version="1.0"]')).to_be_visible()
    recommendation = page.locator("#recommendations .recommendation").first
    expect(recommendation).to_contain_text(re.compile("evidence", re.IGNORECASE))
    expect(recommendation).to_contain_text(re.compile("predict|gain", re.IGNORECASE))
    ids = {rec["id"] for rec in report["recommendations"]}
    assert recommendation.get_attribute("data-id") in ids
    browsing.shot("workflow-charts")

    recommendation.locator("button.apply").click()
    expect(page.locator('.applied[data-version="1.1"]')).to_be_visible()
    browsing.shot("applied")
    versions = console.api.get(f"/workflows/{WORKFLOW}").json()["versions"]
    assert versions == ["1.0", "1.1"], versions


def test_the_executions_list_updates_live_filters_and_finds_by_idempotency_key(
    browsing: Browsing, console: Console
) -> None:
    contract = contract_waiting(console)
    paid = console.start(invoice(2101), key="browser-invoice-2101")
    console.wait(paid, "completed")
    page = browsing.page

    browsing.visit(f"{console.url}/", "executions", ready="table#executions")
    expect(row(page, contract)).to_have_attribute("data-status", "waiting")
    expect(row(page, paid)).to_have_attribute("data-status", "completed")

    browsing.mark_document()
    later = contract_waiting(console)
    expect(row(page, later)).to_be_visible()  # the table refreshes itself
    assert browsing.still_same_document(), "the page was reloaded"
    browsing.shot("executions-live")

    filters = page.locator("form#filters")
    filters.locator('select[name="status"]').select_option("waiting")
    submit(filters)
    expect(row(page, paid)).to_have_count(0)
    expect(row(page, contract)).to_be_visible()
    expect(row(page, later)).to_be_visible()
    expect(page.locator('tr.execution:not([data-status="waiting"])')).to_have_count(0)
    browsing.shot("executions-waiting")

    search = page.locator("form#search")
    search.locator('input[name="q"]').fill("browser-invoice-2101")
    search.locator('input[name="q"]').press("Enter")
    expect(page).to_have_url(re.compile(rf"/ui/executions/{paid}(\?.*)?$"))
    expect_status(page, "completed")
    browsing.shot("found-by-key")

"""The web console in a real browser: Chromium and a page per test that leaves
screenshots behind, and the `flowledger serve` (with its API) that the pages come from.

A plain module (not conftest) so test modules can import it, like tests/e2e's drivers.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import support
from playwright.sync_api import (
    Browser,
    Error,
    Locator,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

# tests/e2e's drivers import each other as top-level modules (`from cli_driver import`), as
# pytest makes them when it collects tests/e2e; when only tests/browser is collected, put
# their folder on the path the same way.
_E2E = str(Path(__file__).resolve().parents[1] / "e2e")
if _E2E not in sys.path:
    sys.path.append(_E2E)

from cli_driver import EXAMPLE, EXAMPLE_AGENTS, Cli, wait_for  # noqa: E402
from cli_driver import Receiver as Receiver  # noqa: E402  (re-exported for conftest)
from http_driver import Server, start_server, wait_until  # noqa: E402

WAIT_MS = 30_000  # every wait for the page: generous, the suite runs three processes on two cores
SETTLE_TIMEOUT = 60.0  # an execution reaching a status, seen through the API
BATCH_TIMEOUT = 300.0  # a batch of executions all ending
ENDED = ("completed", "failed", "timed_out", "cancelled")
WORKFLOW = "document-processing"
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT: ViewportSize = {"width": 1400, "height": 900}


def artifacts_dir() -> Path:
    """Where screenshots and console logs go: $FLOWLEDGER_ARTIFACTS, else artifacts/console/."""
    configured = os.environ.get("FLOWLEDGER_ARTIFACTS")
    folder = Path(configured) if configured else support.REPO / "artifacts" / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def launched(executable: Path) -> Iterator[Browser]:
    """A headless Chromium for one test. Launched per test, not per session: leaving the
    `with sync_playwright()` block is what gives the thread back its own (no) asyncio loop,
    which later asyncio tests in the same process need; a launch costs about a second."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


_WATCH = """selector => {
    const seen = (window.__flowledgerSeen ||= new Set());
    const look = () => { if (document.querySelector(selector)) seen.add(selector); };
    const everything = {subtree: true, childList: true, attributes: true};
    new MutationObserver(look).observe(document, everything);
    look();
}"""


@dataclass
class Browsing:
    """One test's page: every page it shows is saved as `<test>-<nn>-<what>.png`."""

    page: Page
    test: str
    folder: Path
    console: list[str] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list, repr=False)
    _shots: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.test = re.sub(r"[^\w.-]+", "_", self.test).strip("_")
        # What an earlier run of this test left (a failure's screenshot would mislead).
        mine = re.compile(rf"{re.escape(self.test)}-(\d\d-.*\.png|console\.log)")
        for old in self.folder.iterdir():
            if mine.fullmatch(old.name):
                old.unlink()
        self.page.on("console", self._on_console)
        self.page.on("pageerror", self._on_page_error)
        # A native confirm() would be dismissed by Playwright, which is "no": say yes, as a
        # user going through with an action does, and note that it was asked.
        self.page.on("dialog", self._on_dialog)

    def visit(self, url: str, what: str, ready: str | None = None) -> None:
        """Go to `url`, wait for `ready` (a selector) to be there, save a screenshot."""
        response = self.page.goto(url)
        if response is not None and not response.ok:
            self.shot(f"{what}-http-{response.status}")
            pytest.fail(f"GET {url} answered {response.status}:\n{response.text()[:2000]}")
        if ready is not None:
            expect(self.page.locator(ready).first).to_be_attached()
        self.shot(what)

    def shot(self, what: str) -> Path:
        """A full-page screenshot, numbered in the order the test took them."""
        self._shots += 1
        path = self.folder / f"{self.test}-{self._shots:02d}-{what}.png"
        self.page.screenshot(path=path, full_page=True)
        return path

    def save_as(self, name: str) -> Path:
        """The top of the page as a window shows it, under a fixed name (the README's
        picture)."""
        path = self.folder / name
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=path)
        return path

    def mark_document(self) -> None:
        """Leave a mark in the window: `still_same_document` tells whether it was reloaded."""
        self.page.evaluate("window.__flowledgerBrowserTest = 'not reloaded'")

    def still_same_document(self) -> bool:
        """Whether the window marked by `mark_document` is still there (no reload since)."""
        return bool(self.page.evaluate("window.__flowledgerBrowserTest === 'not reloaded'"))

    def watch(self, selector: str) -> None:
        """From now on, note whether an element matching `selector` ever appears, even for a
        moment (a part of the page that refreshes itself may replace it soon after)."""
        self.page.evaluate(_WATCH, selector)

    def expect_seen(self, selector: str) -> None:
        """Wait until an element `watch`ed for has appeared (in this same document)."""
        self.page.wait_for_function(
            "selector => (window.__flowledgerSeen || new Set()).has(selector)", arg=selector
        )

    def save_failure(self) -> None:
        """After a failure: a last screenshot and what the page wrote on its console."""
        if self.page.url != "about:blank":  # else it failed before showing anything
            try:
                self.shot("failure")
            except Error as exc:
                self.console.append(f"(no failure screenshot: {exc})")
        log = self.folder / f"{self.test}-console.log"
        lines = [f"url: {self.page.url}", *self.console, *(f"PAGE ERROR: {e}" for e in self.errors)]
        log.write_text("\n".join(lines) + "\n")

    def _on_console(self, message: Any) -> None:
        self.console.append(f"console.{message.type}: {message.text} ({message.location})")

    def _on_page_error(self, error: Error) -> None:
        self.errors.append(f"{self.page.url}: {error.stack or f'{error.name}: {error.message}'}")

    def _on_dialog(self, dialog: Any) -> None:
        self.console.append(f"dialog {dialog.type}: {dialog.message} (accepted)")
        dialog.accept()


# -- the server and its API --------------------------------------------------------------------


@dataclass
class Console:
    """A `flowledger serve` on a fresh store, and a client of its API (with its token)."""

    server: Server
    token: str | None
    api: httpx.Client

    @property
    def url(self) -> str:
        """The base URL the pages are served from."""
        return self.server.url

    def register(self) -> None:
        """POST the example workflow's YAML (the e2e copy, whose `notify` reaches the receiver)."""
        response = self.api.post(
            "/workflows",
            content=EXAMPLE.read_bytes(),
            headers={"Content-Type": "application/yaml"},
        )
        assert response.status_code in (200, 201), response.text

    def start(self, document_url: str, key: str | None = None) -> str:
        """Start the example on a document; returns the execution id."""
        headers = {"Idempotency-Key": key} if key is not None else {}
        response = self.api.post(
            f"/workflows/{WORKFLOW}/executions",
            json={"input": {"document_url": document_url}},
            headers=headers,
        )
        assert response.status_code == 201, response.text
        execution_id: str = response.json()["execution_id"]
        return execution_id

    def wait(self, execution_id: str, *statuses: str) -> dict[str, Any]:
        """The execution document, once its status is one of `statuses`."""
        return wait_until(self.api, execution_id, *statuses, timeout=SETTLE_TIMEOUT)

    def wait_all_ended(self, execution_ids: list[str]) -> dict[str, str]:
        """Poll the API until every execution has ended; returns each one's status."""
        statuses: dict[str, str] = {}

        def probe() -> bool:
            for eid in execution_ids:
                if statuses.get(eid) not in ENDED:
                    response = self.api.get(f"/executions/{eid}")
                    assert response.status_code == 200, response.text
                    statuses[eid] = response.json()["status"]
            return all(s in ENDED for s in statuses.values())

        wait_for(f"{len(execution_ids)} executions to end", probe, timeout=BATCH_TIMEOUT)
        return statuses

    def close(self) -> None:
        """Stop the server (SIGTERM): it must exit cleanly, with no traceback in its log."""
        self.api.close()
        code = self.server.stop()
        assert code == 0, self.server.output
        assert "Traceback" not in self.server.output, self.server.output


def start_console(home: Path, receiver: Receiver, token: str | None = None) -> Console:
    """`flowledger serve --port 0 --agents examples/agents.py` on a fresh store in `home`."""
    cli = Cli(home)
    cli.env["NOTIFY_ADDR"] = receiver.addr
    if token is not None:
        cli.env["FLOWLEDGER_API_TOKEN"] = token
    server = start_server(cli, "--agents", EXAMPLE_AGENTS)
    return Console(server, token, server.client(token))


# -- the pages' forms --------------------------------------------------------------------------


def submit_button(form: Locator) -> Locator:
    """The button that submits `form`."""
    return form.locator("button:not([type=button]):not([type=reset]), input[type=submit]").first


def submit(form: Locator) -> None:
    """Submit a form as its submit button would (for forms the contract gives no button)."""
    form.evaluate("form => form.requestSubmit()")

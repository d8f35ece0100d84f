"""Browser fixtures: Debian's Chromium driven by Playwright (sync API), a page per test that
saves screenshots, and `flowledger serve` on a fresh store for the console's pages.

The tests are plain sync functions: Playwright's sync API refuses to run inside an asyncio
loop, and pytest-asyncio (asyncio_mode=auto) leaves sync tests alone.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import chromium
import pytest
from console_driver import (
    VIEWPORT,
    WAIT_MS,
    Browsing,
    Console,
    Receiver,
    artifacts_dir,
    launched,
    start_console,
)
from playwright.sync_api import expect

expect.set_options(timeout=WAIT_MS)

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the test, so `browsing` knows at teardown if it failed."""
    report: pytest.TestReport = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


@pytest.fixture(scope="session")
def chromium_executable() -> Path:
    """Chromium: $FLOWLEDGER_CHROMIUM, /usr/bin/chromium or on PATH; else Debian's package,
    installed now (once, under a lock shared by the xdist workers). Fails, never skips."""
    return chromium.chromium_executable()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """The folder screenshots go to ($FLOWLEDGER_ARTIFACTS, else artifacts/console/)."""
    return artifacts_dir()


@pytest.fixture
def browsing(
    chromium_executable: Path, artifacts: Path, request: pytest.FixtureRequest
) -> Iterator[Browsing]:
    """A new context and page for the test. On failure, a last screenshot and the page's
    console are saved; any uncaught JavaScript error on a page fails the test."""
    with launched(chromium_executable) as browser:
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(WAIT_MS)
        view = Browsing(context.new_page(), request.node.name, artifacts)
        try:
            yield view
        finally:
            reports = request.node.stash.get(_REPORTS, {})
            if any(r.failed for r in reports.values()) or view.errors:
                view.save_failure()
            context.close()
    if view.errors:
        errors = "\n".join(view.errors)
        pytest.fail(f"uncaught JavaScript errors on the page:\n{errors}", pytrace=False)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The webhook receiver the example's `notify` step posts to."""
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def serve(tmp_path: Path, receiver: Receiver) -> Iterator[Callable[..., Console]]:
    """Starts `flowledger serve` (optionally with FLOWLEDGER_API_TOKEN) on a fresh store;
    each is stopped at the end and must exit cleanly."""
    started: list[Console] = []

    def start(token: str | None = None) -> Console:
        console = start_console(tmp_path / f"store-{len(started)}", receiver, token)
        started.append(console)
        return console

    yield start
    for console in started:
        console.close()


@pytest.fixture
def console(serve: Callable[..., Console]) -> Console:
    """`flowledger serve` without a token, the example workflow registered."""
    started = serve()
    started.register()
    return started

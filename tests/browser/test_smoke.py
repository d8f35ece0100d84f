"""The browser tests' own machinery, on pages that are not the console's: Chromium starts,
reaches `flowledger serve`, and screenshots land in the artifacts folder."""

from __future__ import annotations

from pathlib import Path

from console_driver import Browsing, Console
from playwright.sync_api import expect


def test_chromium_shows_the_servers_health_and_api_description(
    browsing: Browsing, console: Console, artifacts: Path
) -> None:
    browsing.visit(f"{console.url}/healthz", "healthz", ready="body")
    expect(browsing.page.locator("body")).to_contain_text("ok")

    browsing.visit(f"{console.url}/openapi.json", "openapi", ready="body")
    body = browsing.page.locator("body")
    expect(body).to_contain_text('"openapi"')
    expect(body).to_contain_text("/workflows/{workflow_id}/executions")

    shots = sorted(p.name for p in artifacts.glob(f"{browsing.test}-*.png"))
    assert shots == [f"{browsing.test}-01-healthz.png", f"{browsing.test}-02-openapi.png"]
    assert not browsing.errors

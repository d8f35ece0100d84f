"""The web console of `flowledger serve`: server-rendered pages (Jinja2) made live with
htmx, over the same service as the HTTP API. Assets ship in the package (static/)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from flowledger.adapters.console.executions import add_execution_pages
from flowledger.adapters.console.pages import STATIC, Pages
from flowledger.adapters.console.workflows import add_workflow_pages
from flowledger.adapters.http_service import ApiService


def add_console(app: FastAPI, service: ApiService, *, token_required: bool) -> None:
    """Serve the console at `/` (pages under /ui, assets under /ui/static)."""
    pages = Pages(token_required)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="console-static")
    add_execution_pages(app, service, pages)
    add_workflow_pages(app, service, pages)

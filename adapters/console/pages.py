"""What every console page shares: the template environment (autoescaped), display
filters, the security headers, and error pages."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from flowledger.adapters.http_status import status_of
from flowledger.domain.errors import FlowledgerError, InputInvalid

HERE = Path(__file__).parent
STATIC = HERE / "static"
NONE = "\u2013"  # an en dash: no value
TERMINAL = frozenset({"completed", "failed", "timed_out", "cancelled"})
# Everything the pages load comes from this server: no inline script, no eval, no frames.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def seconds(value: float | None) -> str:
    """A duration for people: 0.41 s, 12.3 s, 4 m 05 s, 2 h 03 m."""
    if value is None:
        return NONE
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} m"


def when(value: str | datetime | None) -> str:
    """An ISO time as `2026-11-27 22:40:01 UTC`."""
    if value is None:
        return NONE
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (" UTC" if moment.utcoffset() is not None else "")


def percent(value: float | None) -> str:
    """A share as a percentage (one decimal)."""
    return NONE if value is None else f"{value * 100:.1f}%"


def pretty(value: Any) -> str:
    """JSON for reading (indented; keys in their order)."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


MAX_FIELDS = 200


async def form_data(request: Request) -> dict[str, str]:
    """A posted form (application/x-www-form-urlencoded, as htmx sends it); the body's size
    is bounded by the API's limit before it gets here."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise InputInvalid(f"a form is sent as application/x-www-form-urlencoded, not {kind!r}")
    try:
        text = (await request.body()).decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError:
        raise InputInvalid("the form is not UTF-8") from None
    except ValueError:
        raise InputInvalid(f"the form has more than {MAX_FIELDS} fields") from None
    return dict(pairs)


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(seconds=seconds, when=when, percent=percent, pretty=pretty)
    env.globals["terminal"] = TERMINAL
    return env


class Pages:
    """Renders the console's templates into responses."""

    def __init__(self, token_required: bool) -> None:
        self.env = _environment()
        self.token_required = token_required

    def render(
        self,
        request: Request,
        template: str,
        status_code: int = 200,
        headers: dict[str, str] | None = None,
        **context: Any,
    ) -> HTMLResponse:
        """A page or fragment, with the security headers."""
        html = self.env.get_template(template).render(
            request=request, token_required=self.token_required, **context
        )
        return HTMLResponse(html, status_code=status_code, headers={**HEADERS, **(headers or {})})

    def error(self, request: Request, exc: FlowledgerError, fragment: bool = False) -> Response:
        """An error as a page, or as a fragment for the part of a page that asked. A part
        that refreshes itself keeps what it shows through a passing outage of the store
        (204: nothing to swap) and tries again at its next turn."""
        status = status_of(exc)
        if fragment and status >= 500 and request.method == "GET":
            return Response(status_code=204, headers=HEADERS)
        template = "error_fragment.html" if fragment else "error.html"
        return self.render(
            request, template, status_code=status, error=type(exc).__name__, detail=str(exc)
        )

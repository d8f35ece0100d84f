"""Markup helpers for the console's SVG: every text and attribute is user data, escaped."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping


def esc(text: object) -> str:
    """Text escaped for SVG content or a quoted attribute: ids and names are user data."""
    return html.escape(str(text), quote=True)


def attrs(values: Mapping[str, str | None]) -> str:
    """` name="value"` for each attribute whose value is not None, values escaped."""
    return "".join(f' {name}="{esc(value)}"' for name, value in values.items() if value is not None)


def num(value: float) -> str:
    """A coordinate: at most one decimal, no trailing zeros."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def token(value: str) -> str:
    """A value made safe as one class name: anything else than [A-Za-z0-9_-] becomes "-"."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", value) or "-"


def truncate(text: str, chars: int) -> str:
    """`text` cut to `chars` characters, the last an ellipsis when something was cut."""
    chars = max(chars, 2)
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"

"""Bounds on untrusted JSON: how deep a document may nest."""

from __future__ import annotations

from typing import Any

MAX_JSON_DEPTH = 64  # objects and lists; deeper input is refused, never recursed into


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply objects and lists nest in `value` (stops counting past `limit`)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level > limit:
                return level
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return deepest

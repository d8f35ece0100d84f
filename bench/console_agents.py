"""The benchmark's one action: answers at once, so an execution's size is its events."""

from __future__ import annotations

from typing import Any

from flowledger.adapters.agents import ActionContext, action


@action("bench.item")
def item(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Echo the item it was given."""
    return {"item": data.get("item")}

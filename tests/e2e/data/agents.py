"""Agents for the end-to-end workflows in this folder, loaded with `--agents`.

E2E_MARKER_DIR, when set, is where `e2e.stall` leaves a file as its first attempt begins
(so a test can tell, from outside, that the attempt is running) and where
`e2e.release` records each compensation it performs.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from flowledger.adapters.agents import ActionContext, action


def _marker_dir() -> Path:
    return Path(os.environ["E2E_MARKER_DIR"])


@action("e2e.reserve")
def reserve(data: dict[str, Any]) -> dict[str, Any]:
    """Reserve stock for an order."""
    return {"reservation": f"R-{data['order']}"}


@action("e2e.release")
def release(data: dict[str, Any]) -> dict[str, Any]:
    """Compensation of e2e.reserve: receives the reserved step's input and result."""
    reservation = data["result"]["reservation"]
    with (_marker_dir() / "released.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps({"step_id": data["step_id"], "reservation": reservation}) + "\n")
    return {"released": reservation}


@action("e2e.ship")
def ship(data: dict[str, Any]) -> dict[str, Any]:
    """Ship the order."""
    return {"shipped": True}


@action("e2e.fail")
def fail(data: dict[str, Any]) -> dict[str, Any]:
    """Always fails, with the message it is given (not retryable: a ValueError)."""
    raise ValueError(data["message"])


@action("e2e.stall")
async def stall(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """The first attempt never returns (its process is meant to be killed); later ones do."""
    if ctx.attempt == 1:
        (_marker_dir() / f"stalled-{ctx.execution_id}").write_text(ctx.step_key)
        await asyncio.Event().wait()
    return {"attempt": ctx.attempt}


@action("e2e.quote")
def quote(data: dict[str, Any]) -> dict[str, Any]:
    """Price an order; each call is logged (a cached step's hits leave no line)."""
    with (_marker_dir() / "quoted.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps(data, sort_keys=True) + "\n")
    return {"price": 10 * data["quantity"]}

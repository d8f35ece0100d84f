"""A gate agent for the retry tests, loaded with `--agents` next to agents.py.

`e2e.gate` fails (a ValueError: not retryable) until a test opens the gate by creating
`gate-open` in E2E_MARKER_DIR; every run it makes is logged to `gate-runs.jsonl` there, so
a test can count how often each step really ran.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flowledger.adapters.agents import ActionContext, action


def _markers() -> Path:
    return Path(os.environ["E2E_MARKER_DIR"])


def _log(step: str, ctx: ActionContext) -> None:
    entry = {"execution_id": str(ctx.execution_id), "step": step, "attempt": ctx.attempt}
    with (_markers() / "gate-runs.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps(entry) + "\n")


@action("e2e.prepare")
def prepare(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Always succeeds; logged, so a test can see it never runs twice."""
    _log("prepare", ctx)
    return {"prepared": data["order"]}


@action("e2e.gate")
def gate(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Fails while the gate is closed; passes once `gate-open` exists."""
    _log("gate", ctx)
    if not (_markers() / "gate-open").exists():
        raise ValueError(f"the gate is closed for {data['prepared']}")
    return {"passed": True}

"""Actions for the remote-agent tests: run by `flowledger agent`, never by the worker."""

from __future__ import annotations

import os
import time
from typing import Any

from flowledger.adapters.agents import ActionContext, action

# Seconds each action takes: long enough that a process killed mid-run has tasks in flight.
LATENCY = float(os.environ.get("E2E_REMOTE_LATENCY", "0.05"))


@action("remote.prepare", capability="prep")
def prepare(data: dict[str, Any]) -> dict[str, Any]:
    time.sleep(LATENCY)
    return {"prepared": int(data.get("n", 0)) + 1}


@action("remote.finish")
def finish(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    time.sleep(LATENCY)
    return {"finished": True, "attempt": ctx.attempt}

"""Agents for the crash tests: every call is written to an append-only ledger.

Loaded by the `flowledger` subprocesses with `--agents tests/integration/crash/agents.py`.

- CRASH_LEDGER (required): the ledger file. Each attempt appends a JSON line when it
  starts and when it ends, with O_APPEND and fsync, so a line written before a SIGKILL
  is there after it.
- CRASH_MARKERS: a folder; a held attempt creates `reached-<key>@<attempt>` in it.
- CRASH_HOLD: comma-separated `key` or `key@attempt`; such an attempt creates its
  marker and then blocks until the process is killed.

An action sleeps `ms` milliseconds of its input (default 30) before it returns.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from flowledger.adapters.agents import ActionContext, action


class TransientError(Exception):
    """A failure a retry fixes."""


def marker_name(key: str, attempt: int) -> str:
    """The marker file a held attempt creates (the test polls for it)."""
    return "reached-" + re.sub(r"[^A-Za-z0-9_.@-]", "_", f"{key}@{attempt}")


def _append(ctx: ActionContext, phase: str, **extra: Any) -> None:
    line = {
        "eid": ctx.execution_id,
        "key": ctx.step_key,
        "step_id": ctx.step_id,
        "attempt": ctx.attempt,
        "attempt_id": ctx.attempt_id,
        "phase": phase,
        "t": time.time(),
        "pid": os.getpid(),
        **extra,
    }
    path = os.environ["CRASH_LEDGER"]
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # A SIGKILL can cut a write short where the line crosses a page of the file (the
        # kernel checks for a fatal signal between pages): end such a torn line first, so
        # this one stands on its own (read_ledger skips the torn one).
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        os.write(fd, (("\n" if torn else "") + json.dumps(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold_if_asked(ctx: ActionContext) -> None:
    held = {h.strip() for h in os.environ.get("CRASH_HOLD", "").split(",") if h.strip()}
    if ctx.step_key not in held and f"{ctx.step_key}@{ctx.attempt}" not in held:
        return
    markers = Path(os.environ.get("CRASH_MARKERS") or Path(os.environ["CRASH_LEDGER"]).parent)
    (markers / marker_name(ctx.step_key, ctx.attempt)).touch()
    while True:  # until the test kills this process
        time.sleep(60)


def _run(data: dict[str, Any], ctx: ActionContext, fails: int = 0) -> dict[str, Any]:
    _append(ctx, "start")
    _hold_if_asked(ctx)
    time.sleep(float(data.get("ms", 30)) / 1000)
    if ctx.attempt <= fails:
        _append(ctx, "end", outcome="error")
        raise TransientError(f"attempt {ctx.attempt} of {ctx.step_key} fails on purpose")
    _append(ctx, "end", outcome="ok")
    return {"key": ctx.step_key, "attempt": ctx.attempt}


@action("crash.step")
def step(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Work for `ms` milliseconds and succeed."""
    return _run(data, ctx)


@action("crash.flaky")
def flaky(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Fail the first `fails` attempts (default 1) with a retryable error, then succeed."""
    return _run(data, ctx, fails=int(data.get("fails", 1)))


@action("crash.broken")
def broken(data: dict[str, Any], ctx: ActionContext) -> dict[str, Any]:
    """Fail for good: ValueError is not retryable under the default policy."""
    _append(ctx, "start")
    _hold_if_asked(ctx)
    _append(ctx, "end", outcome="error")
    raise ValueError(f"{ctx.step_key} cannot succeed")

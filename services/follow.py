"""Commands written straight to the store while a worker drives it, and following them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

from eventsourcing.persistence import IntegrityError

from flowledger.domain.errors import StoreUnavailable
from flowledger.domain.execution import Execution
from flowledger.domain.progress import cancel, complete_human_task, is_settled, retry
from flowledger.domain.workflow import Workflow
from flowledger.services.app import CommandRef, FlowledgerApp
from flowledger.services.ports import Clock, SystemClock

_CONFLICT_RETRIES = 20


def submit_start(
    app: FlowledgerApp,
    wf: Workflow,
    data: Any,
    idempotency_key: str | None,
    clock: Clock | None = None,
    command: CommandRef | None = None,
) -> UUID:
    """Store a new execution for the worker to pick up (or find its idempotent twin).
    `command`, when given, is recorded as handled in the same transaction."""
    now = (clock or SystemClock()).now()
    ex, new = app.new_execution(wf, data, idempotency_key, random.getrandbits(63), now, uuid4())
    also = command.record(ex.id) if command is not None else []
    if new or also:
        app.save(*([ex] if new else []), *also)
    return ex.id


def submit_completion(
    app: FlowledgerApp,
    execution_id: UUID,
    ref: str,
    answer: Any,
    clock: Clock | None = None,
    command: CommandRef | None = None,
) -> str:
    """Store a human task's answer; the worker notices the new events and drives on."""
    key: str = _retrying(
        app,
        execution_id,
        lambda ex, wf, now: complete_human_task(ex, wf, ref, answer, now),
        clock,
        command,
    )
    return key


def submit_cancel(
    app: FlowledgerApp,
    execution_id: UUID,
    reason: str,
    clock: Clock | None = None,
    command: CommandRef | None = None,
) -> None:
    """Store a cancellation; the worker notices it and compensates."""
    _retrying(app, execution_id, lambda ex, wf, now: cancel(ex, wf, reason, now), clock, command)


def submit_retry(
    app: FlowledgerApp,
    execution_id: UUID,
    clock: Clock | None = None,
    *,
    reason: str = "retried by request",
    command: CommandRef | None = None,
) -> None:
    """Store a retry of an execution that failed, timed out or was cancelled; the worker
    notices that it runs again and drives it."""
    _retrying(app, execution_id, lambda ex, wf, now: retry(ex, wf, now, reason), clock, command)


def _retrying(
    app: FlowledgerApp,
    execution_id: UUID,
    apply: Any,
    clock: Clock | None,
    command: CommandRef | None = None,
) -> Any:
    clock = clock or SystemClock()
    for _ in range(_CONFLICT_RETRIES):
        ex = app.execution(execution_id)
        wf = app.workflow(ex.workflow_id, ex.workflow_version)
        result = apply(ex, wf, clock.now())
        try:
            app.save(ex, *(command.record(execution_id) if command is not None else []))
        except IntegrityError:
            if command is not None and app.handled(command.command_id):
                raise  # not a race with the worker: the command was handled meanwhile
            continue  # the worker wrote first: apply the command to the newer state
        return result
    raise StoreUnavailable(f"execution {execution_id} kept changing; try again")


async def follow_until_settled(
    app: FlowledgerApp,
    execution_id: UUID,
    driver_gone: Callable[[], bool] = lambda: False,
    poll: float = 0.2,
) -> Execution | None:
    """Poll the store until the execution ends or waits for a person.

    Returns None as soon as `driver_gone()` says the process driving the store stopped:
    the caller then drives the execution itself.
    """
    wf: Workflow | None = None
    while True:
        ex = await asyncio.to_thread(app.execution, execution_id)
        if wf is None:
            wf = await asyncio.to_thread(app.workflow, ex.workflow_id, ex.workflow_version)
        if is_settled(ex, wf):
            return ex
        if driver_gone():
            return None
        await asyncio.sleep(poll)

"""Histories for the projection tests, written with the aggregate's own commands at chosen
times (so every duration is known), stored in a real application, and the projections
that fold them. Importable as `projection_histories` from tests/unit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import support

from flowledger.domain.execution import Execution
from flowledger.domain.states import ExecutionStatus
from flowledger.projections.runner import Projections
from flowledger.services.app import FlowledgerApp
from flowledger.services.queries import Queries

T0 = datetime(2024, 1, 1, tzinfo=UTC)
STORES = {
    "memory": lambda tmp: {"PERSISTENCE_MODULE": "eventsourcing.popo"},
    "sqlite": lambda tmp: {
        "PERSISTENCE_MODULE": "eventsourcing.sqlite",
        "SQLITE_DBNAME": str(tmp / "flowledger.db"),
    },
}
ORDERS = {
    "workflow_id": "orders",
    "version": "1",
    "tags": ["shop", "eu"],
    "sla_targets": {"duration_p50": 10, "duration_p95": 12, "success_rate": 0.9},
    "steps": [
        {"step_id": "reserve", "type": "action", "action": "shop.reserve"},
        {"step_id": "notify", "type": "webhook", "url": "https://example.com/hook"},
        {"step_id": "approve", "type": "human_task", "assignee": "alice"},
        {
            "step_id": "route",
            "type": "condition",
            "conditions": [{"expression": "express", "steps": ["express"]}],
            "else_steps": ["ship"],
        },
        {"step_id": "express", "type": "action", "action": "shop.express"},
        {"step_id": "ship", "type": "action", "action": "shop.ship", "error_handlers": ["fix"]},
    ],
    "handlers": [{"step_id": "fix", "type": "action", "action": "shop.fix"}],
}


class FixedClock:
    """A clock that says what it is told."""

    def __init__(self, now: datetime) -> None:
        self.moment = now

    def now(self) -> datetime:
        return self.moment


def at(seconds: float) -> datetime:
    """T0 plus some seconds."""
    return T0 + timedelta(seconds=seconds)


def error(kind: str = "RuntimeError", message: str = "boom") -> dict[str, Any]:
    """A step error as the engine records it."""
    return {"type": kind, "message": message, "retryable": True}


class Store:
    """An application with the ORDERS workflow registered, and its projections."""

    def __init__(self, env: dict[str, str]) -> None:
        self.app = FlowledgerApp(env=env)
        self.app.register(support.workflow(ORDERS))
        self.clock = FixedClock(T0)
        self.queries = Queries(self.app, self.clock, batch_size=7)
        self.projections: Projections = self.queries.projections
        self.runner = self.queries.runner

    def register(self, doc: dict[str, Any]) -> None:
        """Register another definition."""
        self.app.register(support.workflow(doc))

    def begin(
        self, start: float, workflow_id: str = "orders", version: str = "1", **data: Any
    ) -> Execution:
        """A new execution started at T0 + `start` seconds (not saved yet)."""
        return Execution.begin(
            execution_id=uuid4(),
            workflow_id=workflow_id,
            workflow_version=version,
            input=dict(data),
            idempotency_key=None,
            seed=1,
            deadline=at(start + 3600),
            at=at(start),
        )

    def save(self, *executions: Execution) -> None:
        """Store the executions' new events."""
        self.app.save(*executions)

    def caught_up(self) -> Projections:
        """The projections, after applying everything stored."""
        self.runner.catch_up()
        return self.projections

    def close(self) -> None:
        """Close the application."""
        self.app.close()


@contextlib.contextmanager
def opened(name: str, tmp: Path) -> Iterator[Store]:
    """A Store on one of STORES, closed at the end."""
    found = Store(STORES[name](tmp))
    try:
        yield found
    finally:
        found.close()


def run_step(ex: Execution, key: str, start: float, end: float, result: Any = None) -> None:
    """A step that starts at `start` and succeeds at `end` (seconds after T0)."""
    ex.start_step(key, key.split("/")[-1], "", {"n": 1}, at(start))
    ex.succeed_step(key, result if result is not None else {"ok": True}, {}, at(end))


def complete(ex: Execution, end: float) -> None:
    """End the execution as completed."""
    ex.finish(ExecutionStatus.COMPLETED, None, at(end))


def failed_at_6(store: Store) -> Execution:
    """An execution that fails at 6 s (saved).

    `reserve` completes (1 to 2 s); `notify` fails after two attempts (2 to 5 s); `route`
    fails to choose, so `express` is skipped; `approve` waits for alice from 2 s and is
    cancelled as the execution fails."""
    ex = store.begin(0)
    run_step(ex, "reserve", 1, 2, {"r": 1})
    ex.start_step("notify", "notify", "", {}, at(2))
    ex.wait_step("approve", "approve", "", {}, "human_deadline", None, at(2), assignee="alice")
    ex.schedule_retry("notify", error(), 1.0, at(4), at(3))
    ex.fire_timer("notify#retry1", at(4))
    ex.start_step("notify", "notify", "", {}, at(4))
    ex.fail_step("notify", error("HTTPError", "503"), at(5))
    ex.start_step("route", "route", "", None, at(5))
    ex.fail_step("route", error("ExpressionError", "bad"), at(5))
    ex.skip_step("express", "express", "", "condition 'route' did not run", at(5))
    ex.cancel_step("approve", "step 'notify' failed", at(6))
    ex.finish(ExecutionStatus.FAILED, "step 'notify' failed", at(6))
    store.save(ex)
    return ex


def retried_at_100(store: Store, ex: Execution) -> None:
    """Retry a `failed_at_6` execution at 100 s (saved): all but `reserve` are reset."""
    ex.retry("retried by request", at(3700), ["notify", "route", "express", "approve"], [], at(100))
    store.save(ex)


def completed_at_110(store: Store, ex: Execution) -> None:
    """Drive a retried `failed_at_6` execution to completion at 110 s (saved): `notify`
    succeeds with its third attempt, `route` chooses `ship` (so `express` is skipped)."""
    ex.start_step("notify", "notify", "", {}, at(100))
    ex.succeed_step("notify", {"sent": True}, {}, at(103))
    ex.select_branch(
        "route", "route", "", None, ["ship"], [("express", "express")], {}, {}, at(103)
    )
    ex.wait_step("approve", "approve", "", {}, "human_deadline", None, at(103), assignee="alice")
    ex.complete_human_task("approve", {"ok": True}, {}, at(105))
    run_step(ex, "ship", 105, 109)
    complete(ex, 110)
    store.save(ex)


FANOUT = {
    "workflow_id": "fanout",
    "version": "1",
    "steps": [
        {
            "step_id": "both",
            "type": "parallel",
            "parallel_steps": [
                {"step_id": "left", "type": "action", "action": "x"},
                {"step_id": "right", "type": "action", "action": "x"},
            ],
        }
    ],
}


def parallel_failed_at_3(store: Store) -> Execution:
    """A FANOUT execution whose parallel fails at 3 s, `right` having failed (saved)."""
    store.register(FANOUT)
    ex = store.begin(0, workflow_id="fanout")
    ex.start_step("both", "both", "", {}, at(0))
    run_step(ex, "left", 0, 2)
    ex.start_step("right", "right", "", {}, at(0))
    ex.fail_step("right", error("ValueError"), at(3))
    ex.fail_step("both", error("ParallelFailed", "1 of 2"), at(3))
    ex.finish(ExecutionStatus.FAILED, "step 'both' failed", at(3))
    store.save(ex)
    return ex


def parallel_retried_at_10(store: Store, ex: Execution) -> None:
    """Retry a `parallel_failed_at_3` execution at 10 s (saved): the parallel resumes."""
    ex.retry("retried by request", at(3610), ["right"], ["both"], at(10))
    store.save(ex)


def parallel_completed_at_14(store: Store, ex: Execution) -> None:
    """`right` runs again (10 to 13 s), the parallel and the execution complete at 14 s."""
    run_step(ex, "right", 10, 13)
    ex.succeed_step("both", {"left": {}, "right": {}}, {}, at(14))
    complete(ex, 14)
    store.save(ex)

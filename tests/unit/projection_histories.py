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
